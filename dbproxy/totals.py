"""dbproxy's counters when workers serve it: what each worker sends its
supervisor at a scrape (``worker_counters``), and the supervisor's counters
made the sum of them (``add_up``), so that /metrics and /status answer for the
whole dbproxy as one process does (proxycore/counters.py does each field).
The pools are each worker's own: their rows are summed by (server, user,
database), the longest wait the largest of them."""

from __future__ import annotations

from typing import Any, Protocol

from proxycore.channel import Message
from proxycore.counters import add, snapshot, zero
from proxycore.servers import TRAFFIC_FIELDS, ServerSet
from proxycore.tls import TlsEnd

from .cancels import Cancels
from .listener import Listener
from .pool import Pools
from .sessionqueue import SessionQueue
from .sslanswers import SslAnswers

_PROXY = ("redials", "startups_waited_on")
_SSL = ("forwarded", "answered_for_server")
_QUEUE = ("queued", "timeouts", "refused", "abandoned", "wait")
_CANCELS = ("routed", "broadcast", "idle")
_LISTENER = ("active", "total", "queued")
_POOL_SUMS = ("active", "idle", "opening", "waiting", "served", "wait_timeouts", "login_failures")


class Counted(Protocol):
    """What of a dbproxy its counters are."""

    listeners: dict[str, Listener]
    servers: ServerSet
    queue: SessionQueue
    cancels: Cancels
    pools: Pools
    ssl_answers: SslAnswers
    tls: TlsEnd | None
    redials: int
    startups_waited_on: int


def worker_counters(proxy: Counted) -> Message:
    """A worker's counters, for the supervisor to sum."""
    return {
        "proxy": snapshot(proxy, _PROXY),
        "ssl": snapshot(proxy.ssl_answers, _SSL),
        "tls": None if proxy.tls is None else proxy.tls.counters.as_dict(),
        "queue": snapshot(proxy.queue, _QUEUE),
        "cancels": snapshot(proxy.cancels, _CANCELS),
        "pools": proxy.pools.status(),
        "listeners": {n: snapshot(lst, _LISTENER) for n, lst in proxy.listeners.items()},
        "servers": {s.name: snapshot(s, TRAFFIC_FIELDS) for s in proxy.servers},
    }


def add_up(proxy: Counted, answers: list[Message]) -> list[dict[str, Any]]:
    """The supervisor's counters made its workers' sum; the pools' rows, summed."""
    zero(proxy, _PROXY)
    zero(proxy.ssl_answers, _SSL)
    if proxy.tls is not None:
        proxy.tls.counters.reset()
    zero(proxy.queue, _QUEUE)
    zero(proxy.cancels, _CANCELS)
    for listener in proxy.listeners.values():
        zero(listener, _LISTENER)
    for server in proxy.servers:
        zero(server, TRAFFIC_FIELDS)
    pools: dict[tuple[str, str, str], dict[str, Any]] = {}
    for answer in answers:
        add(proxy, answer["proxy"])
        add(proxy.ssl_answers, answer["ssl"])
        if proxy.tls is not None and answer["tls"] is not None:
            proxy.tls.counters.absorb(answer["tls"])
        add(proxy.queue, answer["queue"])
        add(proxy.cancels, answer["cancels"])
        for pool in answer["pools"]:
            _add_pool(pools, pool)
        for name, fields in answer["listeners"].items():
            if name in proxy.listeners:
                add(proxy.listeners[name], fields)
        for name, fields in answer["servers"].items():
            known = proxy.servers.get(name)
            if known is not None:
                add(known, fields)
    return list(pools.values())


def _add_pool(into: dict[tuple[str, str, str], dict[str, Any]], pool: dict[str, Any]) -> None:
    key = (pool["server"], pool["user"], pool["database"])
    total = into.get(key)
    if total is None:
        into[key] = dict(pool)
        return
    for field in _POOL_SUMS:
        total[field] += pool[field]
    total["longest_wait_seconds"] = max(total["longest_wait_seconds"], pool["longest_wait_seconds"])
