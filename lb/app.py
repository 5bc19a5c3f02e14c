"""The Balancer: listeners, servers, checks, admin, reload and graceful stop, wired
together, in the role its process has (proxycore/lifecycle.py): one process for
everything; a supervisor (the listening socket, checks, admin, the workers); or a
worker (the hot path on the inherited socket)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from proxycore.admin import make_admin_app, start_admin
from proxycore.balancing import Policy, make_policy
from proxycore.channel import Message
from proxycore.compiled import hot_path, protocol_factory
from proxycore.counters import add, snapshot, zero
from proxycore.deadline import Expiries
from proxycore.health import HealthChecker
from proxycore.lifecycle import SUPERVISOR, WORKER, Placement, log_reloaded
from proxycore.servers import TRAFFIC_FIELDS, Server, ServerSet
from proxycore.workers import SupervisorSide, WorkersCollector, WorkerSide

from .checks import http_probe
from .client import ClientConnection
from .config import LbConfig
from .exchange import Exchange
from .metrics import FIELDS as METRIC_FIELDS
from .metrics import LbCollector, LbMetrics
from .retry import RetryBudget
from .upstream import UpstreamPool

log = logging.getLogger("lb")


_METRICS = METRIC_FIELDS
_BUDGET = ("active", "exhausted")


class Balancer:
    def __init__(
        self,
        config: LbConfig,
        loop: asyncio.AbstractEventLoop,
        placement: Placement | None = None,
    ) -> None:
        self.loop = loop
        self.placement = placement or Placement()
        self._supervisor: SupervisorSide | None = None
        self._worker: WorkerSide | None = None
        # Bound once: compiled code calls it without a method lookup per request.
        self.clock: Callable[[], float] = loop.time
        self.config = config
        self.metrics = LbMetrics()
        self.servers = ServerSet.of(config.servers, config.health)
        self.budget = RetryBudget(config.retry_budget.percent, config.retry_budget.min_concurrency)
        # Read per request: kept here, not looked up through the config each time.
        self.hedge_after = config.hedge_after
        self.max_connecting = config.queue.max_connecting
        self.policy: Policy = make_policy(config.method)
        self.pool = UpstreamPool(loop, config)
        self.default_host = str(config.listen).encode()
        self.clients: set[ClientConnection] = set()
        self.draining = False
        self.started = time.time()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._admin: web.AppRunner | None = None
        self._checker: HealthChecker | None = None
        self._idle = asyncio.Event()
        # Requests waiting for a slot on a server (every fitting one at max_conns),
        # first come first served; each with its queue.timeout.
        self.queue: collections.deque[Exchange] = collections.deque()
        self.queue_limits = Expiries(loop, Exchange.queue_expired)
        # Requests whose connect takes longer than hedge_after (Exchange.connect_slow).
        self.slow_connects = Expiries(loop, Exchange.connect_slow)
        self._wake_due = False
        self._watch(self.servers)

    async def start(self) -> None:
        listen = self.config.listen
        placement = self.placement
        if placement.role == WORKER:
            assert placement.inherited is not None
            self._worker = WorkerSide(
                placement.inherited, self.servers, self.counters, placement.stop
            )
            await self._worker.start()
            self._sock = placement.inherited.listeners["http"]
            self._server = await self.loop.create_server(
                self._client_factory, sock=self._sock, backlog=4096
            )
            self._worker.ready()
            log.info("worker serving %s, hot path %s", listen, hot_path())
            return
        sock = socket.socket(
            socket.AF_INET6 if ":" in listen.host else socket.AF_INET, socket.SOCK_STREAM
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        self._sock = sock
        if placement.role == SUPERVISOR:
            sock.listen(4096)
            self._supervisor = SupervisorSide(self.servers, {"http": sock}, placement.workers)
        else:
            self._server = await self.loop.create_server(
                self._client_factory, sock=sock, backlog=4096
            )
        self._start_checks()
        if self._supervisor is not None:
            # the workers serve before the admin API answers (one says the server is up)
            await self._supervisor.start()
        if self.config.admin is not None:
            app = make_admin_app(
                "lb",
                self.status,
                self.servers.get,
                [
                    LbCollector(self.metrics, lambda: self.servers, lambda: self.budget),
                    WorkersCollector("lb", lambda: self._supervisor),
                ],
                refresh=self._totals if self._supervisor is not None else None,
            )
            self._admin = await start_admin(app, self.config.admin.host, self.config.admin.port)
        log.warning(
            "lb listening on %s, %d server(s), %s, admin %s, %s, hot path %s",
            listen,
            len(self.servers),
            self.config.method,
            self.config.admin or "off",
            f"{placement.workers} workers" if self._supervisor else "one process",
            hot_path(),
        )

    # -- one server, several processes (proxycore/workers.py) -----------------------
    def counters(self) -> Message:
        """A worker's counters, for the supervisor to sum."""
        return {
            "metrics": snapshot(self.metrics, _METRICS),
            "budget": snapshot(self.budget, _BUDGET),
            "servers": {s.name: snapshot(s, TRAFFIC_FIELDS) for s in self.servers},
        }

    async def _totals(self) -> None:
        """The supervisor's counters become the sum of its workers' (before a scrape)."""
        assert self._supervisor is not None
        await self._supervisor.totals(self._sum)

    def _sum(self, answers: list[Message]) -> None:
        zero(self.metrics, _METRICS)
        zero(self.budget, _BUDGET)
        for server in self.servers:
            zero(server, TRAFFIC_FIELDS)
        for answer in answers:
            add(self.metrics, answer["metrics"])
            add(self.budget, answer["budget"])
            for name, fields in answer["servers"].items():
                known = self.servers.get(name)
                if known is not None:
                    add(known, fields)

    async def new_generation(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.workers.replace()

    @property
    def _client_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        return protocol_factory(lambda: ClientConnection(self))

    def _watch(self, servers: Iterable[Server]) -> None:
        for server in servers:
            server.on_change = self._server_changed

    def _server_changed(self, server: Server) -> None:
        """Marked down by the checks, or disabled: requests still waiting there for
        a first byte move on now (Exchange.server_down), idle connections go. A
        supervisor has none: it tells every worker."""
        if self._supervisor is not None:
            self._supervisor.broadcast_state()
            return
        if server.healthy and server.admin != "disabled":
            return
        self.pool.drop(server)
        for client in list(self.clients):
            for ex in list(client.queue):
                ex.server_down(server)

    # -- the queue: overload waits, it does not fail ---------------------------------
    def has_room(self, server: Server) -> bool:
        """Below its max_conns, and a new connection to it may start now (fewer
        than max_connecting in progress) or an idle one waits in the pool."""
        connecting = server.connecting
        if server.active + connecting >= server.limit:
            return False
        return connecting < self.max_connecting or self.pool.has_idle(server)

    def enqueue(self, ex: Exchange) -> None:
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

    def left_queue(self, ex: Exchange) -> None:
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

    def _start_checks(self) -> None:
        if not self.config.check.enabled or self._worker is not None:
            return  # a worker follows its supervisor's checks
        if self._checker is None:
            self._checker = HealthChecker(
                self.servers, http_probe(self.config.check), self.config.check.timing
            )
        self._checker.sync()

    def apply(self, new: LbConfig) -> None:
        """SIGHUP: servers, weights, checks and limits change; connections stay."""
        old = self.config
        if new.listen != old.listen or new.admin != old.admin:
            log.warning(
                "reload: listen and admin addresses change only on restart; keeping %s", old.listen
            )
            new = dataclasses.replace(new, listen=old.listen, admin=old.admin)
        added, removed = self.servers.update(new.servers, new.health)
        self._watch(added)
        for server in removed:
            self.pool.drop(server)
            # its requests stay counted in lb_request_duration_seconds
            self.metrics.latency.add(server.latency.to_json())
        self.hedge_after = new.hedge_after
        self.max_connecting = new.queue.max_connecting
        self.budget.percent = new.retry_budget.percent
        self.budget.min_concurrency = new.retry_budget.min_concurrency
        if new.method != old.method:
            self.policy = make_policy(new.method)
        self.config = new
        self.pool.config = new
        if self._checker is not None and (new.check != old.check or not new.check.enabled):
            self.loop.create_task(self._checker.stop())
            self._checker = None
        self._start_checks()
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGHUP)  # each reads the file again
            self._supervisor.broadcast_state()
        if self._worker is None:
            log_reloaded(log, new.source, len(self.servers), len(added), len(removed))

    def status(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "service": "lb",
            "hot_path": hot_path(),
            "listen": str(self.config.listen),
            "method": self.config.method,
            "uptime_seconds": round(time.time() - self.started, 3),
            "client_connections": m.client_active,
            "in_flight": m.in_flight,
            "retries": m.retries,
            "hedges": m.hedges,
            "hedge_wins": m.hedge_wins,
            "retry_budget": {"active": self.budget.active, "exhausted": self.budget.exhausted},
            "workers": [] if self._supervisor is None else self._supervisor.workers.status(),
            "queue": {
                "length": m.queued,
                "timeouts": m.queue_timeouts,
                "refused": m.queue_refused,
            },
            "no_server": m.no_server,
            "draining": self.draining,
            "pools": {"http": [s.status() for s in self.servers]},
        }

    def _stop_listening(self) -> None:
        """Close the listener without resetting the connections the kernel has
        queued on it (closing a listening socket resets them): a duplicate keeps
        the socket open while the server closes, what is queued is accepted and
        served, then the duplicate closes."""
        server, sock = self._server, self._sock
        self._server = self._sock = None
        if server is None or sock is None:
            return
        if self._worker is not None:
            server.close()  # the socket stays open in the supervisor and the other workers
            return
        spare = sock.dup()
        server.close()
        spare.setblocking(False)
        try:
            while True:
                try:
                    conn, _ = spare.accept()
                except (BlockingIOError, InterruptedError):
                    break
                self.loop.create_task(self.loop.connect_accepted_socket(self._client_factory, conn))
        finally:
            spare.close()

    def client_closed(self) -> None:
        if self.draining and not self.clients:
            self._idle.set()

    async def shutdown(self) -> None:
        """SIGTERM: stop accepting, finish in-flight requests (up to timeouts.shutdown);
        every response from now on says Connection: close, and idle connections
        close after timeouts.shutdown_idle (see ClientConnection.drain)."""
        self.draining = True
        if self._supervisor is not None:
            await self._stop_supervising()
            return
        self._stop_listening()
        for client in list(self.clients):
            client.drain()
        if self.clients:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.timeouts.shutdown)
            except TimeoutError:
                log.warning(
                    "shutdown: %d connection(s) still busy after %gs; closing them",
                    len(self.clients),
                    self.config.timeouts.shutdown,
                )
                for client in list(self.clients):
                    client.close()
        if self._checker is not None:
            await self._checker.stop()
        self.queue_limits.close()
        self.slow_connects.close()
        self.pool.close_all()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._worker is not None:
            self._worker.close()
        log.warning("lb stopped")

    async def _stop_supervising(self) -> None:
        """SIGTERM to a supervisor: its workers drain (each as one process would),
        then the checks, the admin API and the socket go."""
        assert self._supervisor is not None
        await self._supervisor.stop(self.config.timeouts.shutdown + 5)
        if self._checker is not None:
            await self._checker.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._sock is not None:
            self._sock.close()
        log.warning("lb stopped")
