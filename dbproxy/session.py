"""A client session: its first packet, a server for it, then a plain two-way relay.

The server is dialled as soon as the client is accepted, as HAProxy does in TCP
mode: the listener alone decides which server fits, and Postgres forks the
session's backend on accept, so for a client whose first packet is still on its
way (one across a network) the fork and our connect overlap that wait instead of
following it. The first packet is read meanwhile, within limits (10,000 bytes as
Postgres, and a time limit); what it asks decides the rest (a CancelRequest or a
bad packet just closes the early connection, which Postgres drops without a log
line). After it, bytes go both ways unread, except
the server's first messages, watched for BackendKeyData so a later
CancelRequest can find this session's server. Back-pressure both ways through
proxycore's Valve; TCP_NODELAY (uvloop sets it on every TCP transport, see
tests/test_proxycore_loop.py); a half-close is passed on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, cast

from proxycore.compiled import protocol_factory
from proxycore.flow import HalfClose, Reason, Valve, bound_writes
from proxycore.servers import Server

from .pgwire import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    BackendKeyWatcher,
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    error_response,
    packet_length,
    parse_first_packet,
    unsupported_protocol,
)

if TYPE_CHECKING:
    from .listener import Listener
    from .view import Proxy

log = logging.getLogger("dbproxy")


class ClientSession:
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.server_side: ServerSide | None = None
        self.server: Server | None = None
        self.closed = False
        self._buffer = b""
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
        # The client settled TLS (an SSLRequest answered) or GSSAPI encryption
        # (a GSSENCRequest): the server reads another such request as a startup
        # packet of an unknown protocol, and refuses it.
        self._ssl_done = False
        self._gss_done = False
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

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.valve = Valve(self.transport)
        proxy = self.proxy
        if proxy.draining or proxy.client_count >= proxy.config.max_client_connections:
            self.closed = True
            self.transport.write(error_response("53300", "sorry, too many clients already"))
            self.transport.close()
            return
        proxy.sessions.add(self)
        self.listener.active += 1
        self.listener.total += 1
        bound_writes(self.transport)
        proxy.first_packet_limits.set(self, proxy.loop.time() + proxy.config.timeouts.first_packet)
        # No server fitting now is not an answer yet: the client hears it after
        # its startup packet, as an ErrorResponse it prints.
        self._dial_next()

    def data_received(self, data: bytes) -> None:
        out = self._out
        if out is not None:  # the relay, once established: nothing else to decide
            out.write(data)
            self.server.bytes_out += len(data)  # type: ignore[union-attr]
            return
        if self._connecting:
            self._pending.append(data)
            if len(self._pending) > 1:  # a client that does not wait: held to one read
                self.valve.pause(Reason.NO_PEER_YET)  # type: ignore[union-attr]
            return
        self._buffer += data
        self._first_packet()

    def eof_received(self) -> bool | None:
        if self.queued and not self.closed:
            # Its client left while it waited for a slot: nothing was sent to a
            # server, so nothing is owed; it leaves the queue now.
            self.proxy.queue.abandoned += 1
            self.proxy.queue.left(self)
            self.close()
            return None
        if self._out is None and self._connecting and not self.closed:
            # The client ended its side while what it sent waits on the server
            # (an SSLRequest's answer, a connect): it is answered first, as the
            # server would answer it, and the end goes on once the relay is open.
            self._ended_early = True
            return True
        side = self.server_side
        return self.ends.ended(side.transport if side is not None else None, self.close_both)

    def close_both(self) -> None:
        self.close()
        if self.server_side is not None:
            self.server_side.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.first_packet_limits.clear(self)
        if self.queued:
            self.proxy.queue.left(self)
        if self._unanswered is not None:
            self._unanswered = None
            self.proxy.startup_limits.clear(self)
        if self._dial is not None:
            self._dial.cancel()
            self._dial_done()
        if self in self.proxy.sessions:
            self.proxy.sessions.discard(self)
            self.listener.active -= 1
        if self.server is not None:
            self.proxy.detach(self, self.server)
        if self._key is not None:
            self.proxy.cancels.forget(self._key, self)
        self._free_slot()
        for side in (self.server_side, self._probing, self._ready):
            if side is not None:
                side.close()
        # Each ServerSide points back here: without this the session and both
        # transports would wait for the cyclic collector (measured with perf
        # under pgbench -C: a tenth of dbproxy's user CPU went to collections).
        self.server_side = self._probing = self._ready = None
        self._out = None
        self.proxy.session_closed()

    def pause_writing(self) -> None:
        if self.server_side is not None and self.server_side.valve is not None:
            self.server_side.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        if self.server_side is not None and self.server_side.valve is not None:
            self.server_side.valve.resume(Reason.PEER_BUFFER_FULL)

    # -- the first packet ---------------------------------------------------------
    def _first_packet(self) -> None:
        while True:
            try:
                length = packet_length(self._buffer)
                if length is None or len(self._buffer) < length:
                    return
                packet, self._buffer = self._buffer[:length], self._buffer[length:]
                first = parse_first_packet(packet, self._ssl_done, self._gss_done)
            except ProtocolViolation as exc:
                # The server drops such a client without a word (it only logs it)
                log.info("session from %s on %s dropped: %s", self.peer(), self.listener.name, exc)
                self.close()
                return
            if isinstance(first, GSSENCRequest):
                # No GSSAPI encryption here; the client goes on in clear or asks for TLS.
                self._gss_done = True
                self.write(b"N")
                continue
            if isinstance(first, SSLRequest):
                self._ssl_done = True
                if self.proxy.config.ssl == "refuse":
                    self.write(b"N")
                    continue
                if self._dial is None and self._ready is None and not self._dial_next():
                    # As a server without TLS answers; the StartupMessage that
                    # follows then gets the real ErrorResponse, which psql prints.
                    self.write(b"N")
                    continue
                if self.proxy.refuses_ssl(self._target):
                    self.write(b"N")  # what it said a moment ago (see DbProxy.refuses_ssl)
                    continue
                # The server answers; whatever the client sends before the
                # answer waits (in _buffer and _pending) and is read after an
                # 'N', or goes on as the start of TLS after an 'S'.
                self._send(packet, probe=True)
                return
            if isinstance(first, CancelRequest):
                self.proxy.cancels.deliver(first, self.listener.name, pooled=False)
                self.close()  # as a server does: no answer to a cancel
                return
            # A startup packet: the server judges it, but for a negotiation asked
            # again, which dbproxy may have answered itself (the server never saw it)
            self.proxy.first_packet_limits.clear(self)
            code = first.protocol
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                self.refuse("0A000", unsupported_protocol(code))
                return
            if self._refusal is not None:
                self.refuse(*self._refusal)
                return
            initial = packet + self._buffer
            self._buffer = b""
            self._send(initial, probe=False)
            return

    def _send(self, data: bytes, probe: bool) -> None:
        """``data`` to the server, now if it is connected, else once it is."""
        ready, self._ready = self._ready, None
        if ready is not None:
            if ready.transport is not None and not ready.transport.is_closing():
                self._to_server(ready, data, probe)
                return
            ready.close()  # the server hung up meanwhile: dial again
            self._free_slot()
        self._want = data
        self._want_probe = probe
        self._connecting = True
        assert self.valve is not None
        self.valve.pause(Reason.NO_PEER_YET)
        if self._dial is None and not self._dial_next():
            self._no_server()
        elif self.queued:
            # Waiting for a slot: read on, so that a client that leaves is seen
            # leaving (and its place given up) at once; what it sends is held,
            # to one read, as while connecting.
            self.valve.resume(Reason.NO_PEER_YET)

    def _to_server(self, side: ServerSide, data: bytes, probe: bool) -> None:
        # The server must answer within timeouts.startup (see startup_late).
        self._unanswered = data
        proxy = self.proxy
        proxy.startup_limits.set(self, proxy.loop.time() + proxy.config.timeouts.startup)
        side.expect_answer()
        if probe:
            self._probing = side
            self._connecting = True  # the client's next bytes wait for the answer
            side.expect_ssl_answer()
            assert side.transport is not None
            side.transport.write(data)  # the SSLRequest; its answer comes to ssl_answer()
        else:
            self._connecting = True  # what the client sends waits for the answer
            self._relay(side, data, answered=False)

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
        try:
            _, protocol = await self.proxy.loop.create_connection(
                protocol_factory(functools.partial(ServerSide, self, server)),
                address.host,
                address.port,
            )
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            self._dial_failed(server, f"connect failed: {exc}", at_once=refused)
            return
        except asyncio.CancelledError:
            if not self._dial_timed_out:
                raise  # the session ended first
            self._dial_failed(server, "connect timed out", timed_out=True)
            return
        self._dial_done()
        side = cast(ServerSide, protocol)
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

    def _dial_failed(
        self, server: Server, why: str, *, at_once: bool = False, timed_out: bool = False
    ) -> None:
        self._dial_done()
        self._free_slot()
        server.connect_errors += 1
        # A timed-out connect counts only when it was the server's only one in
        # flight: with others it may be our own burst, not a dead server.
        if not timed_out or server.connecting == 0:
            server.record_failure(why, at_once=at_once)
        self.failed.append(server)
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

    def refuse_as_server(self, code: str, message: str) -> None:
        """Refuse in the order a server would: a client waiting for the answer to
        its SSLRequest hears 'N' first, and the ErrorResponse answers its startup
        packet (an ErrorResponse to an SSLRequest is one psql and asyncpg do not print)."""
        if self._want is None or not self._want_probe:
            self.refuse(code, message)
            return
        self._want = None
        self._refusal = (code, message)
        self._read_on_in_clear()

    def ssl_answer(self, side: ServerSide, answer: bytes) -> None:
        """The server answered the forwarded SSLRequest."""
        self._probing = None
        self.proxy.ssl_answered(side.server, answer)
        if answer == b"S":
            # TLS end to end from here on: relay; the session's key stays unseen.
            # Bytes the client sent before the answer go first, as the server
            # would have read them (its TLS handshake refuses what is not TLS).
            side.watcher = None
            held, self._buffer = self._buffer, b""
            self._relay(side, held, answered=True)
            self.write(b"S")
            return
        self._ready = side
        self._read_on_in_clear()

    def _read_on_in_clear(self) -> None:
        """'N' to the client's SSLRequest: its next packet is read here, like a first packet."""
        self._connecting = False
        self.write(b"N")
        if self._pending:
            self._buffer += b"".join(self._pending)
            self._pending.clear()
        assert self.valve is not None
        self.valve.resume(Reason.NO_PEER_YET)
        self._first_packet()
        if self._ended_early and not self._connecting:
            self.close()  # the client ended with no whole packet more: nothing to wait for

    def _relay(self, side: ServerSide, initial: bytes, answered: bool) -> None:
        """The session is ``side``'s from here; the relay opens both ways once the
        server has answered (``answered``, or its first byte: server_answered)."""
        server = side.server
        self.server = server
        self.server_side = side
        side.relaying(self.transport)
        self.proxy.attach(self, server)
        assert side.transport is not None
        if initial:
            side.transport.write(initial)
            server.bytes_out += len(initial)
        if answered:
            self._open_relay(side)

    def server_answered(self, side: ServerSide) -> None:
        """The first byte from ``side`` since it was sent the first packet: it lives."""
        if self._unanswered is None:
            return
        self._unanswered = None
        self.proxy.startup_limits.clear(self)
        if side is self.server_side:
            self._open_relay(side)

    def _open_relay(self, side: ServerSide) -> None:
        """What the client sent meanwhile goes on, and the relay runs as it comes."""
        self._out = side.transport
        if self._pending:
            assert side.transport is not None
            side.transport.writelines(self._pending)
            self._pending.clear()
        self._connecting = False
        assert self.valve is not None
        self.valve.resume(Reason.NO_PEER_YET)
        if self._ended_early:
            self._ended_early = False
            self.ends.ended(side.transport, self.close_both)

    def startup_late(self) -> None:
        """A server that connected said nothing to the first packet within
        timeouts.startup: frozen (a stopped process's kernel still accepts), or
        swamped. Nothing has gone to the client yet, so, as for a refused connect,
        the next fitting server is dialled with the same packet."""
        side = self._probing or self.server_side
        if side is not None and self._unanswered is not None and not self.closed:
            why = f"no answer to a first packet within {self.proxy.config.timeouts.startup:g}s"
            side.server.record_failure(why)
            self._redial(side, why)

    def server_down(self) -> None:
        """The server of this session was marked down: a session it has not answered
        yet goes on to the next fitting server; one under way is closed at once,
        so that its client reconnects now."""
        side = self._probing or self.server_side
        if side is not None and self._unanswered is not None and not self.closed:
            self._redial(side, f"{side.server.name} is {side.server.state}")
        else:
            self.abort()

    def _redial(self, side: ServerSide, why: str) -> None:
        server = side.server
        data, probe = self._unanswered, side is self._probing
        assert data is not None
        self._unanswered = None
        self.proxy.startup_limits.clear(self)
        if self.server is not None:
            self.proxy.detach(self, self.server)
            self.server = None
        self._free_slot()
        self.server_side = self._probing = None
        side.abort()
        self.failed.append(server)
        self.proxy.redials += 1
        log.warning(
            "session from %s on %s: %s; trying the next server",
            self.peer(),
            self.listener.name,
            why,
        )
        self._send(data, probe)

    def first_packet_late(self) -> None:
        """No whole first packet (or no answer to its SSLRequest) within timeouts.first_packet."""
        if self.server_side is None and not self.closed:
            self.refuse("08P01", "the first packet did not arrive in time")

    # -- session life -------------------------------------------------------------
    def peer(self) -> str:
        # Asked only when logging: a getpeername() per session is not free.
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    def key_seen(self, key: tuple[int, int]) -> None:
        self._key = key
        if self.server is not None:
            self.proxy.cancels.remember(key, self)

    def cancel_target(self) -> tuple[Server, tuple[int, int]] | None:
        """The server's own key, to the server this session is relayed to."""
        if self.server is None or self._key is None:
            return None
        return self.server, self._key

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def refuse(self, code: str, message: str) -> None:
        """A real ErrorResponse, then the close: psql and asyncpg print the message."""
        log.info("session from %s on %s refused: %s", self.peer(), self.listener.name, message)
        self.write(error_response(code, message))
        self.close()

    def close(self) -> None:
        self._out = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """The server went down: close at once so the client reconnects now."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class ServerSide:
    def __init__(self, client: ClientSession, server: Server) -> None:
        self.client = client
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.watcher: BackendKeyWatcher | None = BackendKeyWatcher()
        self._out: asyncio.Transport | None = None  # the client's transport, once only relaying
        self._client_transport: asyncio.Transport | None = None
        self._ssl_probe = False  # the first byte answers an SSLRequest: 'S' or 'N'
        self._owes_answer = False  # sent a first packet, no byte back yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.valve = Valve(self.transport)
        bound_writes(self.transport)

    def data_received(self, data: bytes) -> None:
        self.server.bytes_in += len(data)
        out = self._out
        if out is not None:  # relaying and done watching: straight through
            out.write(data)
            return
        if self._owes_answer:
            self._owes_answer = False
            self.client.server_answered(self)
        if self._ssl_probe:
            self._ssl_probe = False
            self.client.ssl_answer(self, data[:1])
            data = data[1:]
            if not data:
                return
        if self.client.server_side is not self:
            return  # held after 'N': a server says nothing before the startup packet
        self.client.write(data)
        watcher = self.watcher
        if watcher is None:
            return
        watcher.feed(data)
        if watcher.key is not None:
            self.client.key_seen(watcher.key)
        if watcher.done:
            self.watcher = None
            self._out = self._client_transport

    def expect_ssl_answer(self) -> None:
        self._ssl_probe = True

    def expect_answer(self) -> None:
        self._owes_answer = True

    def relaying(self, client_transport: asyncio.Transport | None) -> None:
        self._client_transport = client_transport
        if self.watcher is None:
            self._out = client_transport

    def eof_received(self) -> bool | None:
        client = self.client
        peer = client.transport if not client.closed else None
        return client.ends.ended(peer, client.close_both)

    def connection_lost(self, exc: Exception | None) -> None:
        self._out = None
        client = self.client
        if client.server_side is self or client._probing is self:
            client.close()

    def pause_writing(self) -> None:
        if self.client.valve is not None:
            self.client.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        if self.client.valve is not None:
            self.client.valve.resume(Reason.PEER_BUFFER_FULL)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
