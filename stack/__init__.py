"""The whole topology of the seed as local processes: Postgres master and logical
replica, the users backends, and (later) either profile's proxies."""
