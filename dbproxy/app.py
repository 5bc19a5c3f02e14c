"""The DbProxy: listeners by role, servers and their checks, sessions, cancels,
admin, in the role its process has (proxycore/lifecycle.py): one process; a
supervisor (listening sockets, checks, admin, the workers); or a worker."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from aiohttp import web

from proxycore.admin import make_admin_app, start_admin
from proxycore.balancing import make_policy
from proxycore.channel import Message
from proxycore.compiled import hot_path, protocol_factory
from proxycore.deadline import Expiries
from proxycore.health import HealthChecker
from proxycore.lifecycle import SUPERVISOR, WORKER, Placement, log_reloaded
from proxycore.servers import CheckRecord, Server, ServerSet
from proxycore.sides import SupervisorSide, WorkersCollector, WorkerSide
from proxycore.silence import StallWatch
from proxycore.tls import TlsEnd, TlsSettings
from proxycore.tlsmetrics import TlsCollector
from proxycore.workers import Worker

from . import routing
from .cancels import Cancels, in_workers
from .checks import pg_probe
from .choice import Choice
from .credentials import Secrets
from .listener import Listener, listening
from .liveness import postmaster_answers
from .metrics import DbProxyCollector
from .pool import Pools
from .pooled import PooledSession
from .servertls import server_tls
from .session import ClientSession
from .sessionqueue import SessionQueue
from .settings import LISTENERS, CheckSettings, DbProxyConfig
from .sslanswers import SslAnswers
from .totals import add_up, worker_counters

log = logging.getLogger("dbproxy")

# max_sessions "auto" leaves this many of a server's slots to its checks, a psql
# of a person's and other clients that do not go through dbproxy.
AUTO_SESSION_MARGIN = 5


class DbProxy:
    def __init__(
        self,
        config: DbProxyConfig,
        loop: asyncio.AbstractEventLoop,
        placement: Placement | None = None,
    ) -> None:
        self.loop = loop
        self.placement = placement or Placement()
        self._supervisor: SupervisorSide | None = None
        self._worker: WorkerSide | None = None
        self._sockets: list[socket.socket] = []
        self.config = config
        self.servers = ServerSet.of(config.servers, config.health)
        self.choice = Choice(self.servers, lambda: self.config.ro, make_policy(config.method))
        self.listeners = {
            name: Listener(name, config.pool.mode) for name in LISTENERS if name in config.listen
        }
        self.sessions: set[Any] = set()
        self.by_server: dict[Server, set[ClientSession]] = {}
        self.cancels = Cancels(loop, lambda: self.config.timeouts.connect)
        self.cancels.targets = self.choice.may_route
        self.server_tls = server_tls(config.server_ssl, config.server_ssl_ca)
        self.pools = Pools(loop, config.pool, config.timeouts.connect, self.server_tls)
        self.secrets = Secrets(config.auth, loop)
        self.tls = None
        if config.ssl == "terminate" and config.tls is not None:
            self.tls = TlsEnd("dbproxy", config.tls, self.placement.tickets)
        self._pool_totals: list[dict[str, Any]] = []  # a supervisor's: its workers' pools
        self.redials = 0  # sessions sent on to another server: the first never answered
        # sessions whose server answered their first packet late, with no other
        # server to go to: waited on (ClientSession.startup_late)
        self.startups_waited_on = 0
        self.ssl_answers = SslAnswers(loop.time, lambda: self.config.ssl_refusal_memory)
        self.draining = False
        self.started = time.time()
        self._checker = self._health_checker(config.check)
        self._admin: web.AppRunner | None = None
        self._idle = asyncio.Event()
        # Sessions waiting for their first packet, or for a server's connect.
        self.first_packet_limits = Expiries(loop, ClientSession.first_packet_late)
        self.connect_limits = Expiries(loop, ClientSession.connect_late)
        self.startup_limits = Expiries(loop, ClientSession.startup_late)
        self.queue = SessionQueue(
            loop,
            lambda: self.config.queue,
            lambda: self.listeners.values(),
            lambda listener, tried: self.choose(listener, tried, room=True),
        )
        self._stalls = StallWatch(
            loop,
            lambda: self.servers,
            config.timeouts.stall,
            postmaster_answers,
            "sessions",
            config.check.timing.timeout,
            "an SSLRequest",
        )
        self._watch(self.servers)

    @property
    def client_count(self) -> int:
        return len(self.sessions)

    # -- start, reload, stop ------------------------------------------------------
    async def start(self) -> None:
        placement = self.placement
        if placement.role == WORKER:
            assert placement.inherited is not None
            self._worker = WorkerSide(
                placement.inherited,
                self.servers,
                self.counters,
                placement.stop,
                self.cancels.if_mine,
                self._return_to_replica,
            )
            await self._worker.start()
            assert self._worker.channel is not None
            self.cancels.ask_supervisor(self._worker.channel)
            self.pools.start()
            for name, listener in self.listeners.items():
                listener.server = await self.loop.create_server(
                    self._session_factory(listener),
                    sock=placement.inherited.listeners[name],
                    backlog=1024,
                )
            self._stalls.report_to(self._worker)
            self._stalls.start()
            self._worker.ready()
            log.info("worker serving %s", ", ".join(self.listeners))
            return
        # Roles must be known before the first session asks for one.
        await self._checker.check_all()
        sockets = {}
        for name, listener in self.listeners.items():
            sock = listening(self.config.listen[name])
            self._sockets.append(sock)
            if placement.role == SUPERVISOR:
                sockets[name] = sock
            else:
                listener.server = await self.loop.create_server(
                    self._session_factory(listener), sock=sock, backlog=1024
                )
        self._checker.sync()
        if placement.role == SUPERVISOR:
            self._supervisor = SupervisorSide(
                self.servers,
                sockets,
                placement.workers,
                self._from_worker,
                placement.tickets,
                share_limits=True,
            )
            self._stalls.supervise()
        else:
            self._stalls.start()
            self.pools.start()
        if self._supervisor is not None:
            # the workers serve before the admin API answers (one says the server is up)
            await self._supervisor.start()
        if self.config.admin is not None:
            app = make_admin_app(
                "dbproxy",
                self.status,
                self.servers.get,
                [
                    DbProxyCollector(self, self.pool_status),
                    WorkersCollector("dbproxy", lambda: self._supervisor),
                    TlsCollector("dbproxy", lambda: [] if self.tls is None else [self.tls]),
                ],
                refresh=self._totals if self._supervisor is not None else None,
                reload_tls=self.reload_tls,
            )
            self._admin = await start_admin(app, self.config.admin.host, self.config.admin.port)
        log.warning(
            "dbproxy listening on %s; servers: %s; %s; hot path %s",
            ", ".join(f"{n}={self.config.listen[n]}" for n in self.listeners),
            ", ".join(
                f"{s.name} ({s.info.get('role', 'unknown')}, {s.state})" for s in self.servers
            ),
            f"{placement.workers} workers" if self._supervisor else "one process",
            hot_path(),
        )

    def _session_factory(self, listener: Listener) -> Callable[[], asyncio.BaseProtocol]:
        kind = PooledSession if listener.pooled else ClientSession
        return protocol_factory(functools.partial(kind, self, listener))

    # -- one server, several processes (proxycore/workers.py) -----------------------
    def counters(self) -> Message:
        """A worker's counters, for the supervisor to sum."""
        return worker_counters(self)

    async def _totals(self) -> None:
        assert self._supervisor is not None
        await self._supervisor.totals(self._sum)

    def _sum(self, answers: list[Message]) -> None:
        self._pool_totals = add_up(self, answers)

    def pool_status(self) -> list[dict[str, Any]]:
        """Per (server, user, database) pool, as pgbouncer's SHOW POOLS."""
        return self._pool_totals if self._supervisor is not None else self.pools.status()

    def _from_worker(self, worker: Worker, message: Message) -> Any:
        """What a worker asks of its supervisor."""
        op = message.get("op")
        if self._stalls.from_worker(message, self.servers.get):
            return None
        if op == "cancel" and self._supervisor is not None:
            return in_workers(self._supervisor.workers, message)
        return None

    async def new_generation(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.workers.replace()

    def reopen_logs(self) -> None:
        """SIGUSR1: dbproxy writes no log file of its own (its log is stderr)."""

    def reload_tls(self, settings: TlsSettings | None = None) -> dict[str, bool]:
        """ssl = "terminate"'s certificates read again (SIGHUP with the whole
        configuration; the admin API's POST /tls/reload alone)."""
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGHUP)
        return {} if self.tls is None else {"dbproxy": self.tls.reload(settings)}

    def apply(self, new: DbProxyConfig) -> None:
        old = self.config
        restart_only = ("ssl", "server_ssl", "server_ssl_ca")
        if any(getattr(new, key) != getattr(old, key) for key in restart_only):
            log.warning("reload: ssl, server_ssl and server_ssl_ca change only on restart")
            kept = {key: getattr(old, key) for key in (*restart_only, "tls")}
            new = dataclasses.replace(new, **kept)
        if self.tls is not None:
            self.tls.reload(new.tls)  # (a supervisor's workers each reload their own)
        if dict(new.listen) != dict(old.listen) or new.admin != old.admin:
            log.warning("reload: listen and admin addresses change only on restart")
            new = dataclasses.replace(new, listen=old.listen, admin=old.admin)
        added, removed = self.servers.update(new.servers, new.health)
        self._watch(added)
        for server in removed:
            self.ssl_answers.forget(server)
            self.pools.forget(server)
            self.secrets.forget(server.name)
            for session in list(self.by_server.get(server, ())):
                session.abort()
        if new.pool.mode != old.pool.mode or new.auth != old.auth:
            log.warning("reload: pool mode and [auth] change only on restart")
            new = dataclasses.replace(new, pool=dataclasses.replace(new.pool, mode=old.pool.mode))
            new = dataclasses.replace(new, auth=old.auth)
        self.pools.settings = new.pool
        if new.method != old.method:
            self.choice.policy = make_policy(new.method)
        self._stalls.after = new.timeouts.stall
        self._stalls.check_timeout = new.check.timing.timeout
        self.config = new
        if self._worker is not None:
            return  # a worker follows its supervisor's checks; it logs nothing of its own
        if new.check != old.check:
            self.loop.create_task(self._checker.stop())
            self._checker = self._health_checker(new.check)
        self._checker.sync()
        if self._supervisor is not None:
            self._supervisor.workers.signal(signal.SIGHUP)  # each reads the file again
            self._supervisor.broadcast_state()
        log_reloaded(log, new.source, len(self.servers), len(added), len(removed))

    async def shutdown(self) -> None:
        self.draining = True
        if self._supervisor is not None:
            await self._supervisor.stop(self.config.timeouts.shutdown + 5)
        for listener in self.listeners.values():
            if listener.server is not None:
                listener.server.close()
        if self.sessions:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.timeouts.shutdown)
            except TimeoutError:
                log.warning("shutdown: closing %d session(s) still open", len(self.sessions))
        for session in list(self.sessions):
            session.close()
        await self._checker.stop()
        self._stalls.stop()
        self.pools.close()
        await self.secrets.close()
        self.first_packet_limits.close()
        self.connect_limits.close()
        self.startup_limits.close()
        self.queue.close()
        for sock in self._sockets:
            sock.close()
        if self._worker is not None:
            self._worker.close()
        if self._admin is not None:
            await self._admin.cleanup()
        log.warning("dbproxy stopped")

    # -- routing --------------------------------------------------------------------
    def choose(
        self, listener: Listener, tried: Collection[Server], room: bool = False
    ) -> Server | None:
        return self.choice.choose(listener.name, tried, room)

    def fits(self, server: Server, listener: Listener) -> bool:
        return self.choice.fits(server, listener.name)

    def fitting(self, listener: Listener) -> list[Server]:
        return self.choice.fitting(listener.name)

    def attach(self, session: ClientSession, server: Server) -> None:
        """``session`` relays to ``server`` (its slot was taken when it was dialled)."""
        server.total += 1
        self.by_server.setdefault(server, set()).add(session)

    def session_closed(self) -> None:
        if self.draining and not self.sessions:
            self._idle.set()

    def detach(self, session: ClientSession, server: Server) -> None:
        sessions = self.by_server.get(server)
        if sessions is not None:
            sessions.discard(session)

    # -- health ---------------------------------------------------------------------
    def _health_checker(self, check: CheckSettings) -> HealthChecker:
        probe = pg_probe(check, self.server_tls)  # logged in as sessions are (server_ssl)
        return HealthChecker(self.servers, probe, check.timing, after_check=self._after_check)

    def _watch(self, servers: Iterable[Server]) -> None:
        for server in servers:
            server.on_change = self._server_changed

    def _server_changed(self, server: Server) -> None:
        if self._supervisor is not None:
            self._supervisor.broadcast_state()  # its workers act on it; it has no sessions
            return
        # Back from down it may be another server (restarted, TLS turned on): ask it again.
        self.ssl_answers.forget(server)
        down = not server.healthy or server.admin == "disabled"
        if down:
            self.pools.server_down(server, self.config.close_sessions_on_down)
            self.secrets.forget(server.name)
        if down and self.config.close_sessions_on_down:
            sessions = list(self.by_server.get(server, ()))
            if sessions:
                log.warning(
                    "closing %d session(s) of %s, now %s", len(sessions), server.name, server.state
                )
            for session in sessions:
                session.server_down()
        self._return_to_replica()

    def _after_check(self, server: Server, record: CheckRecord) -> None:
        routing.update_lags(self.servers, self.config.slots)
        if server.spec.max_conns == 0 and self.config.queue.max_sessions_auto:
            # max_sessions "auto": the server's own limit less its reserved slots
            # and a few for checks and people (read by the check).
            room = server.info.get("session_slots")
            if isinstance(room, int):
                server.limit = max(1, room - AUTO_SESSION_MARGIN)
        self._return_to_replica()
        if record.timed_out and server.healthy:
            self._stalls.ask(server, f"a check got no answer ({record.detail})")

    def _return_to_replica(self) -> None:
        """Close the ro sessions parked on the primary once a replica fits ro again
        (HAProxy's on-marked-up shutdown-backup-sessions)."""
        limits = self.config.ro
        if not limits.return_to_replica or "ro" not in self.listeners:
            return
        replica = self.choice.fitting_replica()
        if replica is None:
            return
        parked = [
            session
            for session in self.sessions
            if session.listener.name == "ro" and not session.closed and session.parked_on_primary()
        ]
        if parked:
            log.warning(
                "%s fits ro again: closing %d ro session(s) on the primary",
                replica.name,
                len(parked),
            )
        for session in parked:
            session.abort()

    def _listener_status(self, listener: Listener) -> dict[str, Any]:
        fits = self.choice.fitting(listener.name)
        return {
            "address": str(self.config.listen[listener.name]),
            "sessions": listener.active,
            "pool_mode": listener.pool_mode,
            "queued": listener.queued,
            "servers": [s.name for s in fits],
            "next": self.choice.policy.peek(fits).name if fits else None,
        }

    def status(self) -> dict[str, Any]:
        return {
            "service": "dbproxy",
            "hot_path": hot_path(),
            "listen": {n: str(a) for n, a in self.config.listen.items()},
            "method": self.config.method,
            "uptime_seconds": round(time.time() - self.started, 3),
            "sessions": {n: listener.active for n, listener in self.listeners.items()},
            "listeners": {n: self._listener_status(lst) for n, lst in self.listeners.items()},
            "cancels_to_session_server": self.cancels.routed,
            "cancels_to_every_server": self.cancels.broadcast,
            "cancels_with_nothing_running": self.cancels.idle,
            "sessions_redialed": self.redials,
            "startups_waited_on": self.startups_waited_on,
            "queue": {
                "waiting": self.queue.lengths(),
                "timeouts": self.queue.timeouts,
                "refused": self.queue.refused,
                "abandoned": self.queue.abandoned,
            },
            "pool_mode": self.config.pool.mode,
            "server_pools": self.pool_status(),
            "ssl": self.config.ssl,
            "tls": None if self.tls is None else self.tls.status(),
            "ssl_requests_forwarded": self.ssl_answers.forwarded,
            "ssl_requests_answered_for_server": self.ssl_answers.answered_for_server,
            "draining": self.draining,
            "workers": [] if self._supervisor is None else self._supervisor.workers.status(),
            "pools": {"postgres": [s.status() for s in self.servers]},
        }
