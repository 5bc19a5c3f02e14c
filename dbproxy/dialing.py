"""A relayed session's server: the one its listener fits, dialled at accept; a
slot on it (max_sessions) or a place in the listener's queue; a connect that
fails or times out moves on to the next fitting server. dbproxy/session.py's
ClientSession is the subclass that reads the first packets and relays."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, cast

from proxycore.compiled import protocol_factory
from proxycore.flow import HalfClose
from proxycore.servers import Server

from .clientend import ClientEnd
from .serverside import ServerSide
from .servertls import ServerTlsRefused

if TYPE_CHECKING:
    from .listener import Listener
    from .serverside import RelayedClient
    from .view import Proxy

log = logging.getLogger("dbproxy")


class Dialing(ClientEnd):
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        super().__init__(proxy, listener)
        self.server_side: ServerSide | None = None
        self.server: Server | None = None
        self._pending: list[bytes] = []
        # The first packet (or an SSLRequest) is in, and waits for the server:
        # what the client sends meanwhile is kept in _pending, reading paused.
        self._connecting = False
        self._key: tuple[int, int] | None = None
        self.ends = HalfClose()
        self._out: asyncio.Transport | None = None  # the server's transport, once relaying
        self._dial: asyncio.Task[None] | None = None  # a connect in flight
        self._target: Server | None = None  # the server dialled last
        self._dial_timed_out = False
        self.failed: list[Server] = []  # servers whose connect failed for this session
        self._ready: ServerSide | None = None  # connected, nothing sent to it yet
        self._want: bytes | None = None  # what goes to the server once it is connected
        self._want_probe = False  # ... and it is an SSLRequest, whose answer comes back here
        self._ended_early = False  # the client's end came before the relay opened
        self._probing: ServerSide | None = None  # waiting for the answer to an SSLRequest
        # What the server was sent and has not answered yet (the first packet):
        # sent again to the next server if this one never answers (startup_late).
        self._unanswered: bytes | None = None
        # The server whose session slot this one holds (counted in its active
        # sessions) from the dial on; and whether it waits in the queue for one.
        self._slot: Server | None = None
        self.queued = False
        self.queued_at = 0.0
        # (SQLSTATE, message) the startup packet gets, once 'N' answered its SSLRequest
        self._refusal: tuple[str, str] | None = None

    def _to_server(self, side: ServerSide, data: bytes, probe: bool) -> None:
        """``data`` (the first packet, or an SSLRequest: ``probe``) to a connected server."""
        raise NotImplementedError

    def refuse_as_server(self, code: str, message: str) -> None:
        raise NotImplementedError

    # -- the server connection ------------------------------------------------------
    def _dial_next(self) -> bool:
        """Start connecting to the next fitting server, or wait in the queue for a
        slot when every fitting one is at its max_sessions; False when none fits."""
        if self.queued:
            return True
        proxy = self.proxy
        server = proxy.choose(self.listener, self.failed)
        if server is None:
            return False
        if server.active >= server.limit:
            server = proxy.choose(self.listener, self.failed, room=True)
            if server is None:
                proxy.queue.enqueue(self)
                return True
        self._dial_to(server)
        return True

    def dequeued(self, server: Server) -> None:
        """A slot came free on ``server`` while this waited at the queue's head."""
        self.proxy.queue.left(self)
        self._dial_to(server)

    def queue_late(self) -> None:
        """No slot on any fitting server within queue.timeout."""
        proxy = self.proxy
        if not self.queued or self.closed:
            return
        proxy.queue.left(self)
        proxy.queue.timeouts += 1
        self.refuse_as_server(
            "53300",
            f"dbproxy: every server for listener '{self.listener.name}' stayed at its "
            f"max_sessions for {proxy.config.queue.timeout:g}s; try again later",
        )

    def _free_slot(self) -> None:
        server = self._slot
        if server is not None:
            self._slot = None
            server.active -= 1
            self.proxy.queue.slot_freed()

    def _dial_to(self, server: Server) -> None:
        self._slot = server
        server.active += 1
        self._target = server
        proxy = self.proxy
        self._dial_timed_out = False
        server.connecting += 1
        # A limit that cancels the connect, not asyncio.timeout: no Timeout
        # object, context manager and loop timer per session on this path.
        proxy.connect_limits.set(self, proxy.loop.time() + proxy.config.timeouts.connect)
        self._dial = proxy.loop.create_task(self._connect(server))

    def connect_late(self) -> None:
        """The connect in flight took longer than timeouts.connect."""
        if self._dial is not None:
            self._dial_timed_out = True
            self._dial.cancel()

    async def _connect(self, server: Server) -> None:
        address = server.spec.address
        side: ServerSide | None = None
        try:
            _, protocol = await self.proxy.loop.create_connection(
                protocol_factory(
                    functools.partial(ServerSide, cast("RelayedClient", self), server)
                ),
                address.host,
                address.port,
            )
            side = cast(ServerSide, protocol)
            tls = self.proxy.server_tls
            if tls is not None:  # (within the connect's time limit)
                side.upgraded(await tls.negotiate(self.proxy.loop, side, address.host))
        except (OSError, ServerTlsRefused) as exc:  # (ssl.SSLError is an OSError)
            if side is not None:
                side.abort()
                self._dial_failed(server, exc, "TLS to the server")
                return
            self._dial_failed(server, exc)
            return
        except asyncio.CancelledError:
            if side is not None:
                side.abort()
            if not self._dial_timed_out:
                raise  # the session ended first
            self._dial_failed(server, TimeoutError())
            return
        self._dial_done()
        if self.closed:
            side.close()
        elif self._want is None:
            self._ready = side  # the first packet is still on its way
        else:
            data, self._want = self._want, None
            self._to_server(side, data, self._want_probe)

    def _dial_done(self) -> None:
        self._dial = None
        self.proxy.connect_limits.clear(self)
        if self._target is not None:
            self._target.connecting -= 1

    def _dial_failed(self, server: Server, exc: BaseException, what: str = "connect") -> None:
        self._dial_done()
        self._free_slot()
        server.connect_failed(exc, what)
        self.failed.append(server)
        why = f"{what} failed: {exc}" if str(exc) else f"{what} timed out"
        log.info(
            "session on %s: %s to %s; trying the next server", self.listener.name, why, server.name
        )
        if self.closed or self._dial_next():
            return
        if self._want is not None:
            self._no_server()
        # else the first packet, when it comes, finds no server and is refused

    def _no_server(self) -> None:
        if self.failed:
            what = f"no server answered ({len(self.failed)} tried)"
        else:
            what = "no server is available"
        self.refuse_as_server("57P03", f"dbproxy: {what} for listener '{self.listener.name}'")
