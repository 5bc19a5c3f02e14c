"""The DbProxy: listeners by role, servers and their checks, sessions, cancels,
admin, in the role its process has (proxycore/lifecycle.py): one process; a
supervisor (listening sockets, checks, admin, the workers); or a worker."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from aiohttp import web

from proxycore.admin import make_admin_app, start_admin
from proxycore.balancing import Policy, make_policy, pick
from proxycore.channel import Message
from proxycore.compiled import hot_path, protocol_factory
from proxycore.config import Address
from proxycore.counters import add, snapshot, zero
from proxycore.deadline import Expiries
from proxycore.health import HealthChecker
from proxycore.lifecycle import SUPERVISOR, WORKER, Placement, log_reloaded
from proxycore.servers import TRAFFIC_FIELDS, CheckRecord, Server, ServerSet
from proxycore.silence import StallWatch
from proxycore.workers import SupervisorSide, Worker, WorkersCollector, WorkerSide

from . import routing
from .checks import pg_probe
from .config import LISTENERS, DbProxyConfig
from .liveness import postmaster_answers
from .metrics import DbProxyCollector, WaitHistogram
from .pgwire import CancelRequest, cancel_request
from .session import ClientSession

log = logging.getLogger("dbproxy")

# max_sessions "auto" leaves this many of a server's slots to its checks, a psql
# of a person's and other clients that do not go through dbproxy.
AUTO_SESSION_MARGIN = 5


class _First(Policy):
    """A policy that moves no state: for asking whether any server fits."""

    def choose(self, candidates: Sequence[Server]) -> Server:
        return candidates[0]


_FIRST = _First()


def _listening(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _has_room(server: Server) -> bool:
    return server.active < server.limit


def _with_room(accept: routing.Accept | None, room: bool) -> routing.Accept | None:
    if not room:
        return accept
    if accept is None:
        return _has_room
    return lambda s: accept(s) and s.active < s.limit


@dataclasses.dataclass(eq=False)
class Listener:
    name: str
    server: asyncio.Server | None = None
    active: int = 0
    total: int = 0
    queued: int = 0  # of the queue below, those still waiting
    # sessions waiting for a slot (every fitting server at max_sessions), in order
    queue: collections.deque[ClientSession] = dataclasses.field(default_factory=collections.deque)


# What a worker counts, summed by its supervisor (proxycore/counters.py).
_COUNTERS = (
    "cancels_routed",
    "cancels_broadcast",
    "ssl_forwarded",
    "ssl_answered_for_server",
    "redials",
    "queued",
    "queue_timeouts",
    "queue_refused",
    "queue_abandoned",
    "queue_wait",
)
_LISTENER_COUNTERS = ("active", "total", "queued")


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
        self.policy: Policy = make_policy(config.method)
        self.listeners = {name: Listener(name) for name in LISTENERS if name in config.listen}
        self.sessions: set[ClientSession] = set()
        self.by_server: dict[Server, set[ClientSession]] = {}
        self.keys: dict[tuple[int, int], Server] = {}
        self.cancels_routed = 0
        self.cancels_broadcast = 0
        self.redials = 0  # sessions sent on to another server: the first never answered
        # When each server last answered a forwarded SSLRequest 'N' (loop time).
        self._ssl_refused_at: dict[Server, float] = {}
        self.ssl_forwarded = 0
        self.ssl_answered_for_server = 0
        self.draining = False
        self.started = time.time()
        self._checker = HealthChecker(
            self.servers, pg_probe(config.check), config.check.timing, after_check=self._after_check
        )
        self._admin: web.AppRunner | None = None
        self._idle = asyncio.Event()
        # Sessions waiting for their first packet, or for a server's connect.
        self.first_packet_limits = Expiries(loop, ClientSession.first_packet_late)
        self.connect_limits = Expiries(loop, ClientSession.connect_late)
        self.startup_limits = Expiries(loop, ClientSession.startup_late)
        self.queue_limits = Expiries(loop, ClientSession.queue_late)
        self.queued = 0  # sessions waiting in the listeners' queues
        self.queue_timeouts = 0
        self.queue_refused = 0
        self.queue_abandoned = 0  # sessions whose client left while they waited
        self.queue_wait = WaitHistogram()
        self._wake_due = False
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
                self._from_supervisor,
                self._return_to_replica,
            )
            await self._worker.start()
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
            sock = _listening(self.config.listen[name])
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
                self.servers, sockets, placement.workers, self._from_worker
            )
        else:
            self._stalls.start()
        if self._supervisor is not None:
            # the workers serve before the admin API answers (one says the server is up)
            await self._supervisor.start()
        if self.config.admin is not None:
            app = make_admin_app(
                "dbproxy",
                self.status,
                self.servers.get,
                [
                    DbProxyCollector(
                        lambda: self.listeners.values(),
                        lambda: self.servers,
                        lambda: (self.cancels_routed, self.cancels_broadcast),
                        lambda: (self.ssl_forwarded, self.ssl_answered_for_server),
                        lambda: self.redials,
                        lambda: (
                            self.queue_lengths(),
                            self.queue_timeouts,
                            self.queue_refused,
                            self.queue_abandoned,
                            self.queue_wait,
                        ),
                    ),
                    WorkersCollector("dbproxy", lambda: self._supervisor),
                ],
                refresh=self._totals if self._supervisor is not None else None,
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
        return protocol_factory(functools.partial(ClientSession, self, listener))

    # -- one server, several processes (proxycore/workers.py) -----------------------
    def counters(self) -> Message:
        """A worker's counters, for the supervisor to sum."""
        return {
            "proxy": snapshot(self, _COUNTERS),
            "listeners": {
                n: snapshot(lst, _LISTENER_COUNTERS) for n, lst in self.listeners.items()
            },
            "servers": {s.name: snapshot(s, TRAFFIC_FIELDS) for s in self.servers},
        }

    async def _totals(self) -> None:
        assert self._supervisor is not None
        await self._supervisor.totals(self._sum)

    def _sum(self, answers: list[Message]) -> None:
        zero(self, _COUNTERS)
        for listener in self.listeners.values():
            zero(listener, _LISTENER_COUNTERS)
        for server in self.servers:
            zero(server, TRAFFIC_FIELDS)
        for answer in answers:
            add(self, answer["proxy"])
            for name, fields in answer["listeners"].items():
                if name in self.listeners:
                    add(self.listeners[name], fields)
            for name, fields in answer["servers"].items():
                known = self.servers.get(name)
                if known is not None:
                    add(known, fields)

    def _from_worker(self, worker: Worker, message: Message) -> Any:
        """What a worker asks of its supervisor."""
        op = message.get("op")
        if self._stalls.from_worker(message, self.servers.get):
            return None
        if op == "cancel":
            return self._cancel_anywhere(message["pid"], message["key"])
        return None

    async def _cancel_anywhere(self, pid: int, key: int) -> Message:
        """A CancelRequest a worker did not know the key of: the worker holding that
        session delivers it (and counts it); ``delivered`` False if none did."""
        assert self._supervisor is not None
        answers = await self._supervisor.workers.gather(
            {"op": "cancel_if_yours", "pid": pid, "key": key}
        )
        return {"delivered": any(a.get("delivered") for a in answers)}

    def _from_supervisor(self, message: Message) -> Any:
        """What a worker's supervisor asks of it, but the servers' state and counters."""
        if message.get("op") == "cancel_if_yours":
            server = self.keys.get((message["pid"], message["key"]))
            if server is not None:
                self._deliver(message["pid"], message["key"], None, server)
            return {"delivered": server is not None}
        return None

    async def _cancel_via_supervisor(self, pid: int, key: int, listener: Listener) -> None:
        assert self._worker is not None and self._worker.channel is not None
        try:
            answer = await self._worker.channel.request({"op": "cancel", "pid": pid, "key": key})
        except (ConnectionError, TimeoutError):
            answer = {}
        if not answer.get("delivered"):
            self._deliver(pid, key, listener, None)

    async def new_generation(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.workers.replace()

    def reopen_logs(self) -> None:
        """SIGUSR1: dbproxy writes no log file of its own (its log is stderr)."""

    def apply(self, new: DbProxyConfig) -> None:
        old = self.config
        if dict(new.listen) != dict(old.listen) or new.admin != old.admin:
            log.warning("reload: listen and admin addresses change only on restart")
            new = dataclasses.replace(new, listen=old.listen, admin=old.admin)
        added, removed = self.servers.update(new.servers, new.health)
        self._watch(added)
        for server in removed:
            self._ssl_refused_at.pop(server, None)
            for session in list(self.by_server.get(server, ())):
                session.abort()
        if new.method != old.method:
            self.policy = make_policy(new.method)
        self._stalls.after = new.timeouts.stall
        self._stalls.check_timeout = new.check.timing.timeout
        self.config = new
        if self._worker is not None:
            return  # a worker follows its supervisor's checks; it logs nothing of its own
        if new.check != old.check:
            self.loop.create_task(self._checker.stop())
            self._checker = HealthChecker(
                self.servers, pg_probe(new.check), new.check.timing, after_check=self._after_check
            )
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
        self.first_packet_limits.close()
        self.connect_limits.close()
        self.startup_limits.close()
        self.queue_limits.close()
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
        """The server for a new session of ``listener``, not one of ``tried``;
        ``room``: only among those below their max_sessions. Busy replicas are
        waited for, not spilled onto the primary: ro falls back only when no
        replica fits at all (as HAProxy uses a backup only when the others are down)."""
        limits = self.config.ro
        accept = routing.accept_for(listener.name, limits, fallback=False)
        server = pick(self.servers.order, self.policy, tried, _with_room(accept, room))
        if server is None and listener.name == "ro" and limits.primary_fallback:
            if room and pick(self.servers.order, _FIRST, tried, accept) is not None:
                return None
            fallback = routing.accept_for("ro", limits, fallback=True)
            server = pick(self.servers.order, self.policy, tried, _with_room(fallback, room))
        return server

    # -- the queue: a burst waits for a session slot, it does not fail -----------------
    def enqueue(self, session: ClientSession) -> None:
        settings = self.config.queue
        if self.queued >= settings.max_queue:
            self.queue_refused += 1
            session.refuse_as_server(
                "53300",
                f"dbproxy: every server for listener '{session.listener.name}' is at its "
                f"max_sessions and {settings.max_queue} sessions wait already",
            )
            return
        now = self.loop.time()
        session.queued = True
        session.queued_at = now
        self.queued += 1
        session.listener.queued += 1
        session.listener.queue.append(session)
        self.queue_limits.set(session, now + settings.timeout)

    def left_queue(self, session: ClientSession) -> None:
        """``session`` stops waiting: served, timed out or gone (dropped lazily)."""
        if session.queued:
            session.queued = False
            self.queued -= 1
            session.listener.queued -= 1
            self.queue_limits.clear(session)
            self.queue_wait.observe(self.loop.time() - session.queued_at)

    def queue_lengths(self) -> dict[str, int]:
        return {n: listener.queued for n, listener in self.listeners.items()}

    def slot_freed(self) -> None:
        """A session or a dial ended: the queues' heads may go, on the loop's next turn."""
        if self.queued and not self._wake_due:
            self._wake_due = True
            self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        for listener in self.listeners.values():
            queue = listener.queue
            while queue:
                session = queue[0]
                if not session.queued or session.closed:
                    queue.popleft()
                    continue
                server = self.choose(listener, session._failed, room=True)
                if server is None:
                    break  # first come, first served: the head waits on
                queue.popleft()
                session.dequeued(server)

    def attach(self, session: ClientSession, server: Server) -> None:
        """``session`` relays to ``server`` (its slot was taken when it was dialled)."""
        server.total += 1
        self.by_server.setdefault(server, set()).add(session)

    def session_closed(self) -> None:
        if self.draining and not self.sessions:
            self._idle.set()

    def detach(self, session: ClientSession, server: Server, key: tuple[int, int] | None) -> None:
        sessions = self.by_server.get(server)
        if sessions is not None:
            sessions.discard(session)
        if key is not None and self.keys.get(key) is server:
            del self.keys[key]

    # -- TLS ----------------------------------------------------------------------------
    def ssl_answered(self, server: Server, answer: bytes) -> None:
        """``server`` answered a forwarded SSLRequest."""
        self.ssl_forwarded += 1
        if answer == b"N":
            self._ssl_refused_at[server] = self.loop.time()
        else:
            self._ssl_refused_at.pop(server, None)

    def refuses_ssl(self, server: Server | None) -> bool:
        """Whether ``server`` answered an SSLRequest 'N' within ssl_refusal_memory: then
        its session hears that 'N' from us at once. Forwarded, the SSLRequest waits
        for the backend Postgres forks for it; answered here, the client's startup
        packet is on its way meanwhile (measured under pgbench -S -C: a tenth more
        connections a second). A server that says 'S' is always asked: TLS stays
        end to end."""
        at = None if server is None else self._ssl_refused_at.get(server)
        if at is None or self.loop.time() - at >= self.config.ssl_refusal_memory:
            return False
        self.ssl_answered_for_server += 1
        return True

    # -- cancels ----------------------------------------------------------------------
    def remember_key(self, key: tuple[int, int], server: Server) -> None:
        self.keys[key] = server

    def deliver_cancel(self, request: CancelRequest, listener: Listener) -> None:
        """To the server holding the session when its key was seen; else (a worker)
        to its supervisor, which asks the other workers; else to every server the
        listener may route to (a wrong key is ignored by the others)."""
        server = self.keys.get((request.pid, request.key))
        if server is None and self._worker is not None:
            self.loop.create_task(self._cancel_via_supervisor(request.pid, request.key, listener))
            return
        self._deliver(request.pid, request.key, listener, server)

    def _deliver(
        self, pid: int, key: int, listener: Listener | None, server: Server | None
    ) -> None:
        if server is not None:
            targets: Iterable[Server] = (server,)
            self.cancels_routed += 1
        else:
            name = "any" if listener is None else listener.name
            accept = routing.accept_for(name, self.config.ro, fallback=False)
            fallback = routing.accept_for(name, self.config.ro, fallback=True)
            targets = [
                s
                for s in self.servers
                if accept is None or accept(s) or (fallback is not None and fallback(s))
            ]
            self.cancels_broadcast += 1
        packet = cancel_request(pid, key)
        for target in targets:
            self.loop.create_task(self._send_cancel(target, packet))

    async def _send_cancel(self, server: Server, packet: bytes) -> None:
        address = server.spec.address
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), self.config.timeouts.connect
            )
        except (OSError, TimeoutError) as exc:
            log.info("cancel to %s not delivered: %s", server.name, exc)
            return
        writer.write(packet)
        try:
            await writer.drain()
        finally:
            writer.close()

    # -- health ---------------------------------------------------------------------
    def _watch(self, servers: Iterable[Server]) -> None:
        for server in servers:
            server.on_change = self._server_changed

    def _server_changed(self, server: Server) -> None:
        if self._supervisor is not None:
            self._supervisor.broadcast_state()  # its workers act on it; it has no sessions
            return
        # Back from down it may be another server (restarted, TLS turned on): ask it again.
        self._ssl_refused_at.pop(server, None)
        down = not server.healthy or server.admin == "disabled"
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
        """Close the ro sessions parked on the primary once a replica fits ro again."""
        limits = self.config.ro
        if not limits.return_to_replica or "ro" not in self.listeners:
            return
        replica = pick(
            self.servers.order, _FIRST, [], routing.accept_for("ro", limits, fallback=False)
        )
        if replica is None:
            return
        parked = [
            session
            for server in self.servers
            if routing.is_primary(server)
            for session in self.by_server.get(server, ())
            if session.listener.name == "ro"
        ]
        if parked:
            log.warning(
                "%s fits ro again: closing %d ro session(s) on the primary",
                replica.name,
                len(parked),
            )
        for session in parked:
            session.abort()

    def fitting(self, listener: Listener) -> list[Server]:
        """The servers a new session of ``listener`` may go to now, as choose sees them."""
        limits = self.config.ro
        accept = routing.accept_for(listener.name, limits, fallback=False)
        fits = [s for s in self.servers if s.takes_traffic() and (accept is None or accept(s))]
        if not fits and listener.name == "ro" and limits.primary_fallback:
            fallback = routing.accept_for("ro", limits, fallback=True)
            fits = [
                s
                for s in self.servers
                if s.takes_traffic() and fallback is not None and fallback(s)
            ]
        return fits

    def _listener_status(self, listener: Listener) -> dict[str, Any]:
        fits = self.fitting(listener)
        return {
            "address": str(self.config.listen[listener.name]),
            "sessions": listener.active,
            "queued": listener.queued,
            "servers": [s.name for s in fits],
            "next": self.policy.peek(fits).name if fits else None,
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
            "cancels_to_session_server": self.cancels_routed,
            "cancels_to_every_server": self.cancels_broadcast,
            "sessions_redialed": self.redials,
            "queue": {
                "waiting": self.queue_lengths(),
                "timeouts": self.queue_timeouts,
                "refused": self.queue_refused,
                "abandoned": self.queue_abandoned,
            },
            "ssl_requests_forwarded": self.ssl_forwarded,
            "ssl_requests_answered_for_server": self.ssl_answered_for_server,
            "draining": self.draining,
            "workers": [] if self._supervisor is None else self._supervisor.workers.status(),
            "pools": {"postgres": [s.status() for s in self.servers]},
        }
