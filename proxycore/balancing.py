"""Which server gets the next request or session: policies with no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Final

from .servers import Server

POLICIES: Final = ("round_robin", "least_conn")


class Policy:
    """A base class, not a typing.Protocol: compiled, a call through it is a native
    method call, where a Protocol's is a lookup by name per request."""

    def choose(self, candidates: list[Server]) -> Server:
        raise NotImplementedError

    def peek(self, candidates: list[Server]) -> Server:
        """What ``choose`` would return now, moving no state (for status pages)."""
        raise NotImplementedError


class SmoothWeightedRoundRobin(Policy):
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst."""

    def choose(self, candidates: list[Server]) -> Server:
        total = 0
        best = candidates[0]
        best_weight = 0
        first = True
        for server in candidates:
            server.rr_current += server.weight
            total += server.weight
            if first or server.rr_current > best_weight:
                best, best_weight, first = server, server.rr_current, False
        best.rr_current -= total
        return best

    def peek(self, candidates: list[Server]) -> Server:
        return max(candidates, key=lambda s: s.rr_current + s.weight)


class LeastConn(Policy):
    """Fewest in-flight per unit of weight; ties go round robin so equals share the load."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[Server]) -> Server:
        self._turn += 1
        count = len(candidates)
        best = candidates[self._turn % count]
        for i in range(count):
            server = candidates[(self._turn + i) % count]
            if server.active * best.weight < best.active * server.weight:
                best = server
        return best

    def peek(self, candidates: list[Server]) -> Server:
        return min(candidates, key=lambda s: s.active / s.weight)


def make_policy(name: str) -> Policy:
    if name == "round_robin":
        return SmoothWeightedRoundRobin()
    if name == "least_conn":
        return LeastConn()
    raise ValueError(f"unknown balancing method {name!r}; known: {', '.join(POLICIES)}")


def any_available(servers: Iterable[Server], exclude: Collection[Server] = ()) -> bool:
    """Whether ``pick`` would find a server, without moving any policy's state."""
    now = time.monotonic()
    return any(s not in exclude and s.takes_traffic(now) for s in servers)


def pick(
    servers: list[Server],
    policy: Policy,
    exclude: Collection[Server] = (),
    accept: Callable[[Server], bool] | None = None,
) -> Server | None:
    """The next server among those taking traffic, not in ``exclude`` and (when
    given) accepted by ``accept``; backups only when no primary takes traffic.
    None when nothing fits."""
    if not exclude and accept is None and _all_open_primaries(servers):
        # The usual case: the policy chooses among them all, with no list of
        # candidates built per request.
        return _choose(servers, policy)
    candidates: list[Server] = []
    backups: list[Server] | None = None  # made only when a backup server is seen
    for server in servers:
        # ``open`` is the fast answer; only a passively ejected server without
        # active checks needs the clock (its fail_timeout may be over).
        if not server.open and not (server.passive_out and server.takes_traffic()):
            continue
        if exclude and server in exclude:
            continue
        if accept is not None and not accept(server):
            continue
        if server.spec.backup:
            if backups is None:
                backups = []
            backups.append(server)
        else:
            candidates.append(server)
    return _choose(candidates if candidates or backups is None else backups, policy)


def _choose(candidates: list[Server], policy: Policy) -> Server | None:
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    return policy.choose(candidates)


def _all_open_primaries(servers: list[Server]) -> bool:
    return all(server.open and not server.spec.backup for server in servers)
