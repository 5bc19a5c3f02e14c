"""A pool of servers as requests use it: its servers and their health, how to pick
one, its keep-alive connections, its queue, its retry budget and its checks.

An Exchange sees its pool and nothing of the rest of lb: what it asks of it is
here (pick, has_room, enqueue, the connection pool, the budget); what the pool
sees of a request is a Waiter, the Exchange's base. Overload is not
failure: past a server's max_conns a request waits in the pool's queue (first
come, first served, each with queue.timeout) instead of piling onto the server.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from proxycore.balancing import Policy, make_policy, pick
from proxycore.deadline import Expiries
from proxycore.health import HealthChecker
from proxycore.histogram import BUCKETS
from proxycore.servers import Server, ServerSet

from .checks import http_probe
from .hedgepolicy import HedgePolicy
from .metrics import LbMetrics
from .retry import RetryBudget
from .settings import PoolConfig
from .upstream import Receiver, UpstreamPool

log = logging.getLogger("lb")

TICK = 1.0  # seconds between two marks of the budget's window and the hedge delay


class Waiter(Receiver):
    """What a pool sees of a request: whether it waits in the queue, since when,
    whether it is over; and the calls the queue makes (a slot, a timeout, a
    slow connect, a refusal)."""

    queued = False  # waiting in the pool's queue for a slot on a server
    queued_at = 0.0
    finished = False

    def dequeue(self) -> bool:
        raise NotImplementedError

    def queue_expired(self) -> None:
        raise NotImplementedError

    def connect_slow(self) -> None:
        raise NotImplementedError

    def fail(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        raise NotImplementedError


class Pool:
    def __init__(
        self, config: PoolConfig, loop: asyncio.AbstractEventLoop, metrics: LbMetrics
    ) -> None:
        self.name = config.name
        self.config = config
        self.loop = loop
        self.metrics = metrics
        self.clock = loop.time
        self.servers = ServerSet.of(config.servers, config.health)
        self.policy: Policy = make_policy(config.method, loop.time)
        self.conns = UpstreamPool(loop, config)
        self.budget = RetryBudget(config.retry_budget, loop.time())
        self.hedges = HedgePolicy(
            config.hedge_percentile, config.hedge_min_wins, config.retry_budget.window, loop.time()
        )
        # Read per request: kept here, not looked up through the config each time.
        self.max_connecting = config.queue.max_connecting
        # Requests waiting for a slot on a server (every fitting one at max_conns),
        # first come first served; each with its queue.timeout.
        self.queue: collections.deque[Waiter] = collections.deque()
        self.queue_limits = Expiries(loop, _queue_expired)
        # Requests whose connect takes longer than hedge_after (Exchange.connect_slow).
        self.slow_connects = Expiries(loop, _connect_slow)
        self._wake_due = False
        self._checker: HealthChecker | None = None
        self._ticker = loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        """Once a second: the budget's window moves on, the hedge delay follows
        the latency of the last window."""
        now = self.clock()
        self.budget.tick(now)
        counts = [0] * (len(BUCKETS) + 1)
        for server in self.servers:
            for i, n in enumerate(server.latency.counts):
                counts[i] += n
        self.hedges.tick(now, counts)
        self._ticker = self.loop.call_later(TICK, self._tick)

    def pick(self, tried: tuple[Server, ...], room: bool = False) -> Server | None:
        """The next server for a request that has been to ``tried``; with ``room``,
        only one that has room for it now."""
        if room:
            return pick(self.servers.order, self.policy, tried, self.has_room)
        return pick(self.servers.order, self.policy, tried)

    # -- the queue: overload waits, it does not fail ---------------------------------
    def has_room(self, server: Server) -> bool:
        """Below its max_conns, and a new connection to it may start now (fewer
        than max_connecting in progress) or an idle one waits in the pool."""
        connecting = server.connecting
        if server.active + connecting >= server.limit:
            return False
        return connecting < self.max_connecting or self.conns.has_idle(server)

    def enqueue(self, ex: Waiter) -> None:
        settings = self.config.queue
        if len(self.queue) >= settings.max_queue:
            self.metrics.queue_refused += 1
            ex.fail(503, "queue_full", f"{settings.max_queue} requests wait already", retry_after=1)
            return
        ex.queued = True
        self.metrics.queued += 1
        now = self.clock()
        ex.queued_at = now
        self.queue.append(ex)
        self.queue_limits.set(ex, now + settings.timeout)
        self.slot_freed()  # a slot may be free already (the queue's head just went)

    def left_queue(self, ex: Waiter) -> None:
        """``ex`` stops waiting: served, timed out or gone (the deque drops it lazily)."""
        if ex.queued:
            ex.queued = False
            self.metrics.queued -= 1
            self.queue_limits.clear(ex)
            self.metrics.queue_wait.observe(self.clock() - ex.queued_at)

    def slot_freed(self) -> None:
        """A server's request or connect ended: the queue's head may go. On the
        loop's next turn, not inside the exchange whose end freed the slot."""
        if self.queue and not self._wake_due:
            self._wake_due = True
            self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        queue = self.queue
        while queue:
            ex = queue[0]
            if not ex.queued or ex.finished or ex.dequeue():
                queue.popleft()
            else:
                return  # no room yet: first come, first served

    # -- health ----------------------------------------------------------------------
    def start_checks(self) -> None:
        if not self.config.check.enabled:
            return
        if self._checker is None:
            self._checker = HealthChecker(
                self.servers,
                http_probe(self.config.check, self.conns.tls_for),
                self.config.check.timing,
            )
        self._checker.sync()

    async def stop_checks(self) -> None:
        if self._checker is not None:
            checker, self._checker = self._checker, None
            await checker.stop()

    def apply(self, new: PoolConfig, checks: bool) -> tuple[list[Server], list[Server]]:
        """A reload: servers, weights, checks and limits change; connections stay.
        (added, removed) servers. ``checks``: this process runs the checks."""
        old = self.config
        added, removed = self.servers.update(new.servers, new.health)
        for server in removed:
            self.conns.drop(server)
            # its requests stay counted in lb_request_duration_seconds
            self.metrics.latency.add(server.latency.to_json())
        self.max_connecting = new.queue.max_connecting
        self.budget.configure(new.retry_budget)
        self.hedges.percentile = new.hedge_percentile
        self.hedges.min_wins = new.hedge_min_wins
        self.hedges.window = new.retry_budget.window
        if new.method != old.method:
            self.policy = make_policy(new.method, self.loop.time)
        self.config = new
        self.conns.config = new
        if self._checker is not None and (new.check != old.check or not new.check.enabled):
            checker, self._checker = self._checker, None
            self.loop.create_task(checker.stop())
        if checks:
            self.start_checks()
        return added, removed

    def stop_ticking(self) -> None:
        self._ticker.cancel()

    def close(self) -> None:
        self._ticker.cancel()
        self.queue_limits.close()
        self.slow_connects.close()
        self.conns.close_all()

    def status(self) -> list[dict[str, object]]:
        return [s.status() for s in self.servers]

    def budget_status(self) -> dict[str, object]:
        budget = self.budget
        return {
            "active": budget.active,
            "exhausted": budget.exhausted,
            "spent": budget.spent,
            "requests": budget.requests,
            "extra_attempts": budget.extras,
        }

    def hedging_status(self) -> dict[str, object]:
        hedges = self.hedges
        return {
            "delay_ms": round(1000 * hedges.after(self.config.hedge_after), 1),
            "paused": hedges.paused,
            "sent": hedges.sent,
            "won": hedges.won,
            "suppressed": hedges.suppressed,
        }


def _queue_expired(ex: Waiter) -> None:
    ex.queue_expired()


def _connect_slow(ex: Waiter) -> None:
    ex.connect_slow()
