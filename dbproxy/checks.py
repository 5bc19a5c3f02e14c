"""dbproxy's active check: log in as the check role and ask the server what it is.

A server is writable ("primary") when it is not in recovery and
default_transaction_read_only is off; otherwise it is a "replica". A logical
subscriber is never in recovery, so the second signal is what marks it. On a
primary the check also reads how far each logical slot trails its WAL, and the
position its subscriber has confirmed applying: that is the lag, and the
applied position, of the replica whose subscription owns the slot.
"""

from __future__ import annotations

import asyncpg

from proxycore.servers import Server

from .servertls import ServerTls
from .settings import CheckSettings

ROLE_SQL = """
SELECT pg_is_in_recovery() AS recovery,
       current_setting('default_transaction_read_only') = 'on' AS read_only,
       current_setting('max_connections')::int
         - current_setting('superuser_reserved_connections')::int AS session_slots
"""
SLOTS_SQL = """
SELECT s.slot_name,
       s.active,
       s.confirmed_flush_lsn::text AS applied_lsn,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       COALESCE(EXTRACT(epoch FROM r.replay_lag), 0)::float8 AS lag_seconds
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_type = 'logical'
"""


def pg_probe(settings: CheckSettings, tls: ServerTls | None = None):  # type: ignore[no-untyped-def]
    """``tls``: server_ssl's, so a check logs in as the sessions do (none:
    asyncpg's own default, prefer)."""
    extra = {} if tls is None else {"ssl": tls.for_checks()}

    async def probe(server: Server, timeout: float) -> str:
        address = server.spec.address
        conn = await asyncpg.connect(
            host=address.host,
            port=address.port,
            user=settings.user,
            password=settings.password or None,
            database=settings.database,
            timeout=timeout,
            statement_cache_size=0,
            server_settings={"application_name": "dbproxy-check"},
            **extra,
        )
        try:
            row = await conn.fetchrow(ROLE_SQL)
            writable = not row["recovery"] and not row["read_only"]
            server.info["role"] = "primary" if writable else "replica"
            server.info["session_slots"] = row["session_slots"]
            if writable:
                slots = await conn.fetch(SLOTS_SQL)
                server.info["slots"] = {
                    r["slot_name"]: {
                        "active": r["active"],
                        # how far the subscriber has applied the primary's WAL: what
                        # its apply worker confirmed (it advances with keepalives
                        # when nothing is pending)
                        "applied_lsn": r["applied_lsn"],
                        "lag_bytes": int(r["lag_bytes"] or 0),
                        "lag_seconds": round(float(r["lag_seconds"]), 3),
                    }
                    for r in slots
                }
            else:
                server.info.pop("slots", None)
        finally:
            conn.terminate()
        return f"{server.info['role']}"

    return probe
