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

import logging
from typing import TYPE_CHECKING

from proxycore.flow import Reason
from proxycore.servers import Server

from . import routing
from .dialing import Dialing
from .pgwire import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    unsupported_protocol,
)
from .serverside import ServerSide

if TYPE_CHECKING:
    pass

log = logging.getLogger("dbproxy")


class ClientSession(Dialing):
    # -- asyncio.Protocol -------------------------------------------------------
    def admitted(self) -> None:
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
            got = self.next_first_packet()
            if got is None:
                return
            packet, first = got
            if isinstance(first, GSSENCRequest):
                # No GSSAPI encryption here; the client goes on in clear or asks for TLS.
                self._gss_done = True
                self.write(b"N")
                continue
            if isinstance(first, SSLRequest):
                if self.terminates_tls:
                    self.start_tls()
                    return
                self._ssl_done = True
                if self.proxy.config.ssl == "refuse":
                    self.write(b"N")
                    continue
                if self._dial is None and self._ready is None and not self._dial_next():
                    # As a server without TLS answers; the StartupMessage that
                    # follows then gets the real ErrorResponse, which psql prints.
                    self.write(b"N")
                    continue
                if self.proxy.ssl_answers.refuses(self._target):
                    self.write(b"N")  # what it said a moment ago (dbproxy/sslanswers.py)
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
            side.server.bytes_out += len(data)  # owed an answer: the stall watch sees it
        else:
            self._connecting = True  # what the client sends waits for the answer
            self._relay(side, data, answered=False)

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
        self.proxy.ssl_answers.answered(side.server, answer)
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
        side.server.fails_in_a_row = 0  # an answer: failures are counted in a row
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
        swamped (a burst of logins queued behind its postmaster's forks). Nothing
        has gone to the client yet, so the next fitting server, if there is one,
        is dialled with the same packet.

        Which of the two it is, the stall watch judges, once for the server and
        with a question to confirm it (proxycore/silence.py: the first packet
        is a byte owed like any other), and the checks; not each session on its
        own clock, unconfirmed: a burst of late logins counted as failures took
        the primary out, and every session with it. So a session with no other
        server to go to (rw's primary) waits on its own, as a client connected
        straight to it would, until it answers or is marked down."""
        side = self._probing or self.server_side
        if side is None or self._unanswered is None or self.closed:
            return
        server, proxy = side.server, self.proxy
        if not any(s is not server and s not in self.failed for s in proxy.fitting(self.listener)):
            proxy.startups_waited_on += 1
            return
        self._redial(side, f"no answer to a first packet within {proxy.config.timeouts.startup:g}s")

    def parked_on_primary(self) -> bool:
        return self.server is not None and routing.is_primary(self.server)

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
    def holds(self, side: ServerSide) -> bool:
        """Whether ``side`` is this session's server connection, or its SSL probe."""
        return self.server_side is side or self._probing is side

    def key_seen(self, key: tuple[int, int]) -> None:
        self._key = key
        if self.server is not None:
            self.proxy.cancels.remember(key, self)

    def cancel_target(self) -> tuple[Server, tuple[int, int]] | None:
        """The server's own key, to the server this session is relayed to."""
        if self.server is None or self._key is None:
            return None
        return self.server, self._key

    def close(self) -> None:
        self._out = None
        super().close()
