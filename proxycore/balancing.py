"""Which server gets the next request or session: policies with no I/O."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Iterable
from typing import Final

from .servers import Server

# What a session proxy may balance by (dbproxy: a session's length says nothing
# of a server's speed), and what a request proxy may (lb).
SESSION_POLICIES: Final = ("round_robin", "least_conn")
POLICIES: Final = (*SESSION_POLICIES, "peak_ewma")

# Peak-EWMA (Finagle's and Linkerd's): how long a server's slowness takes to
# fade to 1/e of itself with no faster answers to replace it; what a failed
# attempt counts as (a server that fails fast must not look fast); the least a
# server costs (below it, the count of requests in flight alone decides).
DECAY: Final = 10.0
FAILURE_COST: Final = 1.0
COST_FLOOR: Final = 0.0001


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


def observe(server: Server, seconds: float, now: float) -> None:
    """An attempt on ``server`` took ``seconds`` (sent to answered, or to given up
    on): its peak-EWMA. Slower than the average, it becomes the average at once
    (the peak: one slow answer is news); faster, it moves the average by how
    long it has been since the last (a decay in time, not per answer, so that
    a busy server's history is no longer than an idle one's)."""
    ewma = server.ewma
    if seconds >= ewma:
        server.ewma = seconds
    else:
        elapsed = now - server.ewma_at
        if elapsed > 0:
            w = math.exp(-elapsed / DECAY)
            server.ewma = ewma * w + seconds * (1.0 - w)
    server.ewma_at = now


def failed(server: Server, now: float) -> None:
    """An attempt on ``server`` failed (no answer, or a 5xx): it counts as slow."""
    observe(server, max(FAILURE_COST, 4 * server.ewma), now)


def expected(server: Server, now: float) -> float:
    """The peak-EWMA as of ``now``: with no answer since, it fades towards zero,
    so that a server once slow is tried again (Finagle's PeakEwma.get)."""
    ewma = server.ewma
    elapsed = now - server.ewma_at
    if ewma and elapsed > 0:
        ewma *= math.exp(-elapsed / DECAY)
    return ewma


def load(server: Server, now: float) -> float:
    """What a request sent to ``server`` now is expected to cost it: its latency
    times the requests it has in flight (this one too), per unit of weight."""
    return (expected(server, now) + COST_FLOOR) * (server.active + 1) / (server.weight or 1)


class PeakEwma(Policy):
    """The power of two choices over peak-EWMA latency and requests in flight
    (Finagle's p2c PeakEwma, Linkerd's default): two servers drawn at random,
    the one expected to answer sooner gets the request. A slow server gets
    little traffic until it answers fast again; one that fails counts as slow."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._turn = 0

    def choose(self, candidates: list[Server]) -> Server:
        now = self._clock()
        count = len(candidates)
        if count == 2:
            # both drawn; which one is first alternates, so equals share the load
            self._turn ^= 1
            a, b = candidates[self._turn], candidates[1 - self._turn]
        else:
            i = int(random.random() * count)
            j = int(random.random() * (count - 1))
            a, b = candidates[i], candidates[j + 1 if j >= i else j]
        return b if load(b, now) < load(a, now) else a

    def peek(self, candidates: list[Server]) -> Server:
        now = self._clock()
        return min(candidates, key=lambda s: load(s, now))


def make_policy(name: str, clock: Callable[[], float] = time.monotonic) -> Policy:
    """``clock``: the time the servers' latencies are observed in (peak_ewma)."""
    if name == "round_robin":
        return SmoothWeightedRoundRobin()
    if name == "least_conn":
        return LeastConn()
    if name == "peak_ewma":
        return PeakEwma(clock)
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
