"""Which servers a listener may send a new session to: plain functions over server state.

rw:  the writable server(s).
ro:  read-only servers whose replication lag is under the limits; the primary
     as a fallback when none fits (unless primary_fallback is off).
any: every healthy server, as the seed's HAProxy did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from proxycore.servers import Server

from .settings import ReadOnlyRouting

Accept = Callable[[Server], bool]


def is_primary(server: Server) -> bool:
    return server.info.get("role") == "primary"


def lag_ok(server: Server, limits: ReadOnlyRouting) -> bool:
    lag = server.info.get("lag")
    if lag is None:
        return True  # not measured (the primary is down): a replica still serves reads
    return lag["lag_bytes"] <= limits.max_lag_bytes and lag["lag_seconds"] <= limits.max_lag_seconds


def is_fresh_replica(limits: ReadOnlyRouting) -> Accept:
    return lambda s: s.info.get("role") == "replica" and lag_ok(s, limits)


def accept_for(listener: str, limits: ReadOnlyRouting, fallback: bool) -> Accept | None:
    """The filter of a listener; for ro, ``fallback`` asks for the primary instead."""
    if listener == "rw" or (listener == "ro" and fallback):
        return is_primary
    if listener == "ro":
        return is_fresh_replica(limits)
    return None  # any: every server that takes traffic


def update_lags(servers: Iterable[Server], slots: Mapping[str, str]) -> None:
    """Copy each replica's lag from the primary's slot view onto the replica's info."""
    servers = list(servers)
    primaries = [s for s in servers if is_primary(s) and s.healthy]
    for server in servers:
        slot = slots.get(server.name)
        if slot is None:
            continue
        seen = next(
            (
                p.info.get("slots", {}).get(slot)
                for p in primaries
                if slot in p.info.get("slots", {})
            ),
            None,
        )
        if seen is None:
            server.info.pop("lag", None)
        else:
            server.info["lag"] = {
                "lag_bytes": seen["lag_bytes"],
                "lag_seconds": seen["lag_seconds"],
                "applied_lsn": seen.get("applied_lsn"),
                "slot": slot,
            }
