"""The whole server's counters when workers serve it: what each worker sends
its supervisor at a scrape (``snapshot``), and the supervisor's counters made
the sum of them (``add_up``), so that /metrics and /status answer for the
whole server as one process does (proxycore/counters.py does each field).
The hedge delay and the pause are each worker's own: the largest is shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxycore.channel import Message
from proxycore.counters import add, snapshot, zero
from proxycore.servers import TRAFFIC_FIELDS, ServerGroups

from .listeners import Listener
from .metrics import FIELDS as METRIC_FIELDS
from .metrics import LbMetrics
from .pools import Pool
from .routes import Route

_BUDGET = ("active", "exhausted", "spent", "requests", "extras")
_HEDGES = ("sent", "won", "suppressed")


def worker_counters(
    metrics: LbMetrics,
    pools: Mapping[str, Pool],
    groups: ServerGroups,
    routes: Sequence[Route],
    listeners: Sequence[Listener],
) -> Message:
    """A worker's counters, for the supervisor to sum."""
    return {
        "metrics": snapshot(metrics, METRIC_FIELDS),
        "budget": {name: snapshot(p.budget, _BUDGET) for name, p in pools.items()},
        "hedges": {
            name: {
                **snapshot(p.hedges, _HEDGES),
                "delay": p.hedges.delay,
                "paused": p.hedges.paused,
            }
            for name, p in pools.items()
        },
        "servers": {s.key: snapshot(s, TRAFFIC_FIELDS) for s in groups},
        "routes": {r.name: [r.limited, *r.by_class] for r in routes},
        "tls": {x.name: x.tls.counters.as_dict() for x in listeners if x.tls is not None},
    }


def add_up(
    answers: list[Message],
    metrics: LbMetrics,
    pools: Mapping[str, Pool],
    groups: ServerGroups,
    routes: Sequence[Route],
    listeners: Sequence[Listener],
) -> None:
    """The supervisor's counters become the sum of its workers' ``answers``."""
    zero(metrics, METRIC_FIELDS)
    tls = {x.name: x.tls.counters for x in listeners if x.tls is not None}
    for counters in tls.values():
        counters.reset()
    for pool in pools.values():
        zero(pool.budget, _BUDGET)
        zero(pool.hedges, _HEDGES)
        pool.hedges.delay, pool.hedges.paused = 0.0, False
    for server in groups:
        zero(server, TRAFFIC_FIELDS)
    by_name = {r.name: r for r in routes}
    for route in routes:
        route.limited = 0
        route.by_class[:] = [0] * len(route.by_class)
    for answer in answers:
        add(metrics, answer["metrics"])
        for name, fields in answer["budget"].items():
            if name in pools:
                add(pools[name].budget, fields)
        for name, fields in answer["hedges"].items():
            if name in pools:
                hedges = pools[name].hedges
                hedges.delay = max(hedges.delay, fields.pop("delay"))
                hedges.paused = hedges.paused or fields.pop("paused")
                add(hedges, fields)
        for key, fields in answer["servers"].items():
            known = groups.get(key)
            if known is not None:
                add(known, fields)
        for name, fields in answer["tls"].items():
            if name in tls:
                tls[name].absorb(fields)
        for name, counts in answer["routes"].items():
            known_route = by_name.get(name)
            if known_route is not None:
                known_route.limited += counts[0]
                for i, n in enumerate(counts[1:]):
                    known_route.by_class[i] += n
