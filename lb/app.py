"""The Balancer: listeners, pools, routes, checks, the access log, admin, reload
and graceful stop, wired together in the role its process has
(proxycore/lifecycle.py): one process for everything; a supervisor (the
listening socket, checks, admin, the workers); or a worker (the hot path on the
inherited socket).

The requests themselves never see it: a client connection gets the LbState
(lb/state.py) the Balancer keeps current, an exchange its route and pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from proxycore.admin import make_admin_app, start_admin
from proxycore.channel import Message
from proxycore.compiled import hot_path
from proxycore.lifecycle import SUPERVISOR, WORKER, Placement, log_reloaded
from proxycore.servers import Server, ServerGroups
from proxycore.sides import SupervisorSide, WorkersCollector, WorkerSide
from proxycore.silence import StallWatch
from proxycore.tls import TlsEnd
from proxycore.tlsmetrics import TlsCollector

from .accesslog import AccessLog
from .checks import http_answers
from .client import ClientConnection
from .collector import LbCollector
from .listeners import Listener
from .pools import Pool
from .ratelimit import remove_stale, shared_path
from .routes import Route, build_routes
from .settings import AnswerConfig, LbConfig, ListenerConfig, PoolConfig, RouteConfig
from .state import LbState
from .totals import add_up, worker_counters

log = logging.getLogger("lb")

# The pool of the routes that answer themselves, and of a request no route takes.
ANSWERS = "-"


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
        self.state = LbState(config, loop)
        self.metrics = self.state.metrics
        self.groups = ServerGroups()
        self.pools: dict[str, Pool] = {}
        for pc in config.pools:
            self._add_pool(pc)
        self._answers = Pool(PoolConfig(name=ANSWERS, timeouts=config.timeouts), loop, self.metrics)
        self.routes: list[Route] = []
        self.started = time.time()
        self.listeners = [
            Listener(lc, self.state, self._redirect(lc, config), self.placement.tickets)
            for lc in config.all_listeners
        ]
        self._admin: web.AppRunner | None = None
        self._idle = asyncio.Event()
        self.state.client_closed = self._client_closed
        self._stalls = StallWatch(
            loop,
            lambda: self.groups,
            config.timeouts.stall,
            self._still_answers,
            "requests",
            config.check.timing.timeout,
            "its check",
        )

    @property
    def config(self) -> LbConfig:
        return self.state.config

    @property
    def clients(self) -> set[object]:
        return self.state.clients

    def _add_pool(self, pc: PoolConfig) -> Pool:
        pool = Pool(pc, self.loop, self.metrics)
        self.pools[pc.name] = pool
        self.groups.set(pc.name, pool.servers)
        for server in pool.servers:
            server.on_change = self._server_changed
        return pool

    def _redirect(self, lc: ListenerConfig, config: LbConfig) -> Route | None:
        """A plain listener's 308 to the first TLS listener (redirect_https)."""
        if not lc.redirect_https:
            return None
        port = next(x.address.port for x in config.all_listeners if x.tls is not None)
        to = "https://$host" + ("" if port == 443 else f":{port}") + "$request_uri"
        rc = RouteConfig(name=f"{lc.name}-to-https", answer=AnswerConfig(308, location=to))
        return Route(rc, self._answers, config, None, unrouted=True)

    def _use_routes(self, config: LbConfig) -> None:
        # Workers share each limit's buckets (in a file named for their supervisor).
        shared_by = os.getppid() if self.placement.role == WORKER else 0
        self.routes = build_routes(config, self.pools, self._answers, self.routes, shared_by)
        unrouted = Route(RouteConfig(name=ANSWERS), self._answers, config, None, unrouted=True)
        self.state.use_routes(config, self.routes, unrouted)

    async def start(self) -> None:
        config = self.config
        placement = self.placement
        if placement.role != SUPERVISOR and config.access_log:
            self.state.access = AccessLog(config.access_log, config.access_log_format, self.loop)
        self._use_routes(config)
        if placement.role == WORKER:
            assert placement.inherited is not None
            self._worker = WorkerSide(
                placement.inherited, self.groups, self.counters, placement.stop
            )
            await self._worker.start()
            self._stalls.report_to(self._worker)
            self._stalls.start()
            for listener in self.listeners:
                await listener.serve(self.loop, placement.inherited.listeners[listener.name])
            self._worker.ready()
            log.info("worker serving %s, hot path %s", self._addresses(), hot_path())
            return
        socks = {listener.name: listener.bind() for listener in self.listeners}
        if placement.role == SUPERVISOR:
            stale = remove_stale()  # the limits' files of supervisors killed before
            if stale:
                log.info("removed %d rate-limit file(s) of lb supervisors that are gone", stale)
            for sock in socks.values():
                sock.listen(4096)
            self._supervisor = SupervisorSide(
                self.groups, socks, placement.workers, self._from_worker, placement.tickets
            )
            self._stalls.supervise()
        else:
            for listener in self.listeners:
                await listener.serve(self.loop, socks[listener.name])
            self._stalls.start()
        for pool in self.pools.values():
            pool.start_checks()
        if self._supervisor is not None:
            # the workers serve before the admin API answers (one says the server is up)
            await self._supervisor.start()
        if config.admin is not None:
            app = make_admin_app(
                "lb",
                self.status,
                self.find_server,
                [
                    LbCollector(self.metrics, lambda: self.pools, lambda: self.routes),
                    TlsCollector("lb", self._tls_listeners),
                    WorkersCollector("lb", lambda: self._supervisor),
                ],
                refresh=self._totals if self._supervisor is not None else None,
                reload_tls=self.reload_tls,
            )
            self._admin = await start_admin(app, config.admin.host, config.admin.port)
        log.warning(
            "lb listening on %s, %d pool(s) of %d server(s), %d route(s), admin %s, %s, "
            "hot path %s",
            self._addresses(),
            len(self.pools),
            sum(len(p.servers) for p in self.pools.values()),
            len(self.routes),
            config.admin or "off",
            f"{placement.workers} workers" if self._supervisor else "one process",
            hot_path(),
        )

    def _addresses(self) -> str:
        return ", ".join(
            f"{x.name}={x.config.address}{' (tls)' if x.tls else ''}" for x in self.listeners
        )

    def _tls_listeners(self) -> list[TlsEnd]:
        return [x.tls for x in self.listeners if x.tls is not None]

    def reload_tls(self) -> dict[str, bool]:
        """The certificate files read again, every TLS listener (the admin API's
        POST /tls/reload; SIGHUP does it with the whole configuration)."""
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGHUP)
        return {x.name: x.reload() for x in self.listeners if x.tls is not None}

    def find_server(self, key: str) -> Server | None:
        """A server by "pool/name", or by its name alone when one pool has it."""
        if "/" in key:
            return self.groups.get(key)
        found = [s for s in self.groups if s.name == key]
        return found[0] if len(found) == 1 else None

    # -- gray failures (proxycore/silence.py) -----------------------------------------
    async def _still_answers(self, server: Server, timeout: float) -> bool:
        """Whether ``server`` answers its pool's check within ``timeout``, at all."""
        pool = self.pools.get(server.key.partition("/")[0])
        return pool is not None and await http_answers(
            pool.config.check, server, timeout, pool.conns.tls_for
        )

    def _from_worker(self, worker: object, message: Message) -> Any:
        self._stalls.from_worker(message, self.groups.get)
        return None

    # -- one server, several processes (proxycore/workers.py) -----------------------
    def counters(self) -> Message:
        """A worker's counters, for the supervisor to sum (lb/totals.py)."""
        return worker_counters(self.metrics, self.pools, self.groups, self.routes, self.listeners)

    async def _totals(self) -> None:
        """The supervisor's counters become the sum of its workers' (before a scrape)."""
        assert self._supervisor is not None
        await self._supervisor.totals(self._sum)

    def _sum(self, answers: list[Message]) -> None:
        add_up(answers, self.metrics, self.pools, self.groups, self.routes, self.listeners)

    async def new_generation(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.workers.replace()

    def _server_changed(self, server: Server) -> None:
        """Marked down by the checks, or disabled: requests still waiting there for
        a first byte move on now (Exchange.server_down), idle connections go. A
        supervisor has none: it tells every worker."""
        if self._supervisor is not None:
            self._supervisor.broadcast_state()
            return
        if server.healthy and server.admin != "disabled":
            return
        pool = self.pools.get(server.key.partition("/")[0])
        if pool is not None:
            pool.conns.drop(server)
        for client in list(self.state.clients):
            assert isinstance(client, ClientConnection)
            for ex in list(client.queue):
                ex.server_down(server)

    # -- reload, and the access log's reopening ---------------------------------------
    def apply(self, new: LbConfig) -> None:
        """SIGHUP: pools, servers, routes and limits change; connections stay, and
        requests on their way keep the route and pool they took."""
        old = self.config
        if _shape(new.all_listeners) != _shape(old.all_listeners) or new.admin != old.admin:
            log.warning(
                "reload: listeners and the admin address change only on restart; keeping %s",
                self._addresses(),
            )
            new = dataclasses.replace(
                new, listen=old.listen, listeners=old.listeners, admin=old.admin
            )
        if self._supervisor is None:
            for listener, lc in zip(self.listeners, new.all_listeners, strict=True):
                listener.reload(lc.tls)
        checks = self._worker is None  # a worker follows its supervisor's checks
        added = removed = 0
        for pc in new.pools:
            pool = self.pools.get(pc.name)
            if pool is None:
                pool = self._add_pool(pc)
                added += len(pool.servers)
                if checks:
                    pool.start_checks()
                continue
            gained, lost = pool.apply(pc, checks)
            for server in gained:
                server.on_change = self._server_changed
            self.groups.set(pc.name, pool.servers)
            added, removed = added + len(gained), removed + len(lost)
        for name in [n for n in self.pools if all(pc.name != n for pc in new.pools)]:
            pool = self.pools.pop(name)
            self.groups.drop(name)
            removed += len(pool.servers)
            for server in pool.servers:
                # its requests stay counted in lb_request_duration_seconds
                self.metrics.latency.add(server.latency.to_json())
            self.loop.create_task(self._retire(pool))
        self._stalls.after = new.timeouts.stall
        self._stalls.check_timeout = new.check.timing.timeout
        self._reopen_access(old, new)
        self._use_routes(new)
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGHUP)  # each reads the file again
            self._supervisor.broadcast_state()
        if self._worker is None:
            servers = sum(len(p.servers) for p in self.pools.values())
            log_reloaded(log, new.source, servers, added, removed)

    async def _retire(self, pool: Pool) -> None:
        """A pool the file no longer has: its checks stop and its idle connections
        close; requests on their way finish on theirs (kept idle after, they
        close at the pool's keep-alive timeout)."""
        await pool.stop_checks()
        pool.stop_ticking()
        pool.conns.close_all()

    def _reopen_access(self, old: LbConfig, new: LbConfig) -> None:
        if self._supervisor is not None:
            return  # (its workers write the log)
        same = (new.access_log, new.access_log_format) == (old.access_log, old.access_log_format)
        if same:
            return
        if self.state.access is not None:
            self.state.access.close()
            self.state.access = None
        if new.access_log:
            self.state.access = AccessLog(new.access_log, new.access_log_format, self.loop)

    def reopen_logs(self) -> None:
        """SIGUSR1 (as nginx's): the access log is opened again, at its path, after
        logrotate moved it away; a supervisor passes the signal to its workers."""
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGUSR1)
        elif self.state.access is not None:
            self.state.access.reopen()
        log.info("SIGUSR1: reopening the access log (pid %d)", os.getpid())

    # -- /status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "service": "lb",
            "hot_path": hot_path(),
            "listeners": {x.name: x.status() for x in self.listeners},
            "uptime_seconds": round(time.time() - self.started, 3),
            "client_connections": m.client_active,
            "in_flight": m.in_flight,
            "retries": m.retries,
            "hedges": m.hedges,
            "hedge_wins": m.hedge_wins,
            "retry_budget": {name: p.budget_status() for name, p in self.pools.items()},
            "hedging": {name: p.hedging_status() for name, p in self.pools.items()},
            "workers": [] if self._supervisor is None else self._supervisor.workers.status(),
            "queue": {
                "length": m.queued,
                "timeouts": m.queue_timeouts,
                "refused": m.queue_refused,
            },
            "no_server": m.no_server,
            "draining": self.state.draining,
            "methods": {name: p.config.method for name, p in self.pools.items()},
            "pools": {name: p.status() for name, p in self.pools.items()},
            "routes": {r.name: r.status() for r in self.routes},
        }

    # -- stopping -----------------------------------------------------------------------
    def _stop_listening(self) -> None:
        for listener in self.listeners:
            listener.stop(self.loop, inherited=self._worker is not None)

    def _client_closed(self) -> None:
        if self.state.draining and not self.state.clients:
            self._idle.set()

    async def shutdown(self) -> None:
        """SIGTERM: stop accepting, finish in-flight requests (up to timeouts.shutdown);
        every response from now on says Connection: close, and idle connections
        close after timeouts.shutdown_idle (see ClientConnection.drain)."""
        state = self.state
        state.draining = True
        if self._supervisor is not None:
            await self._stop_supervising()
            return
        self._stop_listening()
        clients = [c for c in state.clients if isinstance(c, ClientConnection)]
        for client in clients:
            client.drain()
        if state.clients:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.timeouts.shutdown)
            except TimeoutError:
                log.warning(
                    "shutdown: %d connection(s) still busy after %gs; closing them",
                    len(state.clients),
                    self.config.timeouts.shutdown,
                )
                for client in [c for c in state.clients if isinstance(c, ClientConnection)]:
                    client.close()
        self._stalls.stop()
        await self._stop_pools()
        if state.access is not None:
            state.access.close()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._worker is not None:
            self._worker.close()
        log.warning("lb stopped")

    async def _stop_pools(self) -> None:
        for pool in self.pools.values():
            await pool.stop_checks()
            pool.close()
        self._answers.close()
        for route in self.routes:
            if route.limiter is not None:
                route.limiter.close()

    async def _stop_supervising(self) -> None:
        """SIGTERM to a supervisor: its workers drain (each as one process would),
        then the checks, the admin API and the socket go."""
        assert self._supervisor is not None
        await self._supervisor.stop(self.config.timeouts.shutdown + 5)
        await self._stop_pools()
        if self._admin is not None:
            await self._admin.cleanup()
        for listener in self.listeners:
            if listener.sock is not None:
                listener.sock.close()
        for route in self.routes:
            if route.limiter is not None:
                shared_path(os.getpid(), route.name).unlink(missing_ok=True)
        log.warning("lb stopped")


def _shape(listeners: tuple[ListenerConfig, ...]) -> list[tuple[object, ...]]:
    """What a reload cannot change (the certificates it can)."""
    return [(x.name, x.address, x.tls is not None, x.hsts, x.redirect_https) for x in listeners]
