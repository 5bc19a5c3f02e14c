"""A client's connection to a listener, whichever kind of session it becomes
(a relay, dbproxy/session.py via dialing.py; pooled, dbproxy/pooled.py via
pooledlogin.py): admitted or refused (too many clients, draining) as a server
refuses, counted, its first packet timed; written to, refused with an
ErrorResponse a client prints, closed."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from proxycore.flow import Valve, bound_writes
from proxycore.tlslayer import Carried, TlsServer, TlsTransport

from .pgwire import (
    FirstPacket,
    ProtocolViolation,
    error_response,
    packet_length,
    parse_first_packet,
)

if TYPE_CHECKING:
    from .listener import Listener
    from .view import Proxy

log = logging.getLogger("dbproxy")


class ClientEnd:
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.closed = False
        self._buffer = b""  # what the client sent that is not read yet
        # The client settled TLS (an SSLRequest answered) or GSSAPI encryption
        # (a GSSENCRequest): the server reads another such request as a startup
        # packet of an unknown protocol, and refuses it.
        self._ssl_done = False
        self._gss_done = False

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
        self.admitted()

    def admitted(self) -> None:
        """What a session does once its client is let in (before its first byte)."""

    # -- ssl = "terminate" ------------------------------------------------------------
    @property
    def terminates_tls(self) -> bool:
        return self.proxy.tls is not None

    def start_tls(self) -> None:
        """'S' to the client's SSLRequest, then TLS with dbproxy's certificate: the
        session goes on inside it, read as in clear (its first packets, its key)."""
        end, raw = self.proxy.tls, self.transport
        assert end is not None and raw is not None
        self._ssl_done = True
        raw.write(b"S")
        tls = TlsServer(
            cast("Carried", self),
            end.certs.context,
            end.counters,
            end.handshake_timeout,
            on_open=self.tls_open,
        )
        raw.set_protocol(tls)  # type: ignore[arg-type]
        tls.connection_made(raw)
        # what the client sent past its SSLRequest is the start of its handshake
        held, self._buffer = self._buffer, b""
        if held:
            tls.data_received(held)

    def tls_open(self, transport: TlsTransport) -> None:
        """The handshake is done: from here the session reads and writes through TLS."""
        self.transport = tls = cast(asyncio.Transport, transport)
        self.valve = Valve(tls)

    def next_first_packet(self) -> tuple[bytes, FirstPacket] | None:
        """The next whole first packet in the buffer, read as the server reads it;
        None while it is not whole, or when it is one the server drops without a
        word (a length out of bounds ...: closed, with one log line)."""
        try:
            length = packet_length(self._buffer)
            if length is None or len(self._buffer) < length:
                return None
            packet, self._buffer = self._buffer[:length], self._buffer[length:]
            return packet, parse_first_packet(packet, self._ssl_done, self._gss_done)
        except ProtocolViolation as exc:
            log.info("session from %s on %s dropped: %s", self.peer(), self.listener.name, exc)
            self.close()
            return None

    def peer(self) -> str:
        # Asked only when logging: a getpeername() per session is not free.
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def refuse(self, code: str, message: str) -> None:
        """A real ErrorResponse, then the close, and one log line: psql and asyncpg
        print the message."""
        log.info("session from %s on %s refused: %s", self.peer(), self.listener.name, message)
        self.fail(code, message)

    def fail(self, code: str, message: str) -> None:
        """The ErrorResponse and the close, with no log line (the caller said why)."""
        self.write(error_response(code, message))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def parked_on_primary(self) -> bool:
        """Held on the primary, where ro's sessions go only while no replica fits
        (so closed when one fits again: DbProxy._return_to_replica)."""
        return False  # (not yet on any server)

    def abort(self) -> None:
        """Closed at once (its server went down: the client reconnects now)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
