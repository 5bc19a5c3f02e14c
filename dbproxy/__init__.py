"""dbproxy: a PostgreSQL-aware TCP proxy that knows the master from the replica."""
