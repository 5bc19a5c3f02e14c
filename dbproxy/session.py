"""A client session: its first packet, a server for it, then a plain two-way relay.

The first packet is read within limits (10,000 bytes as Postgres, and a time
limit); what it asks decides the rest. After it, bytes go both ways unread,
except the server's first messages, watched for BackendKeyData so a later
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
from proxycore.deadline import Deadline
from proxycore.flow import HalfClose, Reason, Valve, bound_writes
from proxycore.servers import Server

from .pgwire import (
    BackendKeyWatcher,
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    error_response,
    packet_length,
    parse_first_packet,
)

if TYPE_CHECKING:
    from .app import DbProxy, Listener

log = logging.getLogger("dbproxy")


class ClientSession:
    def __init__(self, proxy: DbProxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.server_side: ServerSide | None = None
        self.server: Server | None = None
        self.closed = False
        self._buffer = b""
        self._pending: list[bytes] = []
        self._connecting = False
        self._deadline = Deadline(proxy.loop, self._first_packet_timeout)
        self._key: tuple[int, int] | None = None
        self.ends = HalfClose()
        self._out: asyncio.Transport | None = None  # the server's transport, once relaying
        self._probing: ServerSide | None = None  # waiting for the answer to an SSLRequest
        self._held: ServerSide | None = None  # answered 'N': kept for the packet to come

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
        self._deadline.after(proxy.config.timeouts.first_packet)

    def data_received(self, data: bytes) -> None:
        out = self._out
        if out is not None:  # the relay, once established: nothing else to decide
            out.write(data)
            self.server.bytes_out += len(data)  # type: ignore[union-attr]
            return
        if self._connecting:
            self._pending.append(data)
            return
        self._buffer += data
        self._first_packet()

    def eof_received(self) -> bool | None:
        side = self.server_side
        return self.ends.ended(side.transport if side is not None else None, self.close_both)

    def close_both(self) -> None:
        self.close()
        if self.server_side is not None:
            self.server_side.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._deadline.stop()
        if self in self.proxy.sessions:
            self.proxy.sessions.discard(self)
            self.listener.active -= 1
        if self.server is not None:
            self.proxy.detach(self, self.server, self._key)
        for side in (self.server_side, self._probing, self._held):
            if side is not None:
                side.close()
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
                first = parse_first_packet(packet)
            except ProtocolViolation as exc:
                self.refuse("08P01", str(exc))
                return
            if isinstance(first, GSSENCRequest):
                self.write(b"N")  # no GSSAPI encryption here; the client goes on in clear or TLS
                continue
            if isinstance(first, SSLRequest):
                if self._held is not None or self.proxy.config.ssl == "refuse":
                    self.write(b"N")
                    continue
                if self.proxy.choose(self.listener, [], peek=True) is None:
                    # As a server without TLS answers; the StartupMessage that
                    # follows then gets the real ErrorResponse, which psql prints.
                    self.write(b"N")
                    continue
                self._connect_to_server(packet, ssl_probe=True)
                return
            if isinstance(first, CancelRequest):
                if self._held is not None:
                    self._held.close()
                    self._held = None
                self.proxy.deliver_cancel(first, self.listener)
                self.close()  # as a server does: no answer to a cancel
                return
            # StartupMessage
            self._deadline.cancel()
            initial = packet + self._buffer
            self._buffer = b""
            held, self._held = self._held, None
            if held is not None and held.transport is not None and not held.transport.is_closing():
                self._relay(held, initial)
            else:
                self._connect_to_server(initial, ssl_probe=False)
            return

    def _connect_to_server(self, initial: bytes, ssl_probe: bool) -> None:
        self._connecting = True
        assert self.valve is not None
        self.valve.pause(Reason.NO_PEER_YET)
        self.proxy.loop.create_task(self._connect(initial, ssl_probe))

    async def _connect(self, initial: bytes, ssl_probe: bool) -> None:
        proxy = self.proxy
        tried: list[Server] = []
        while not self.closed:
            server = proxy.choose(self.listener, tried)
            if server is None:
                if tried:
                    what = f"no server answered ({len(tried)} tried)"
                else:
                    what = "no server is available"
                self.refuse("57P03", f"dbproxy: {what} for listener '{self.listener.name}'")
                return
            tried.append(server)
            address = server.spec.address
            try:
                # asyncio.timeout, not wait_for: no second task per session.
                async with asyncio.timeout(proxy.config.timeouts.connect):
                    _, protocol = await proxy.loop.create_connection(
                        protocol_factory(functools.partial(ServerSide, self, server, ssl_probe)),
                        address.host,
                        address.port,
                    )
                side = cast(ServerSide, protocol)
            except (OSError, TimeoutError) as exc:
                server.connect_errors += 1
                why = (
                    "connect timed out"
                    if isinstance(exc, TimeoutError)
                    else f"connect failed: {exc}"
                )
                server.record_failure(why)
                continue
            if self.closed:
                side.close()
                return
            if ssl_probe:
                self._probing = side
                assert side.transport is not None
                side.transport.write(initial)  # the SSLRequest; its answer comes to ssl_answer()
                return
            self._relay(side, initial)
            return

    def ssl_answer(self, side: ServerSide, answer: bytes) -> None:
        """The server answered the forwarded SSLRequest."""
        self._probing = None
        if answer == b"S":
            # TLS end to end from here on: relay; the session's key stays unseen.
            side.watcher = None
            self._relay(side, b"")
            self.write(b"S")
            return
        # In clear: the client's next packet is read here, like a first packet.
        self._held = side
        self._connecting = False
        self.write(b"N")
        if self._pending:
            self._buffer += b"".join(self._pending)
            self._pending.clear()
        assert self.valve is not None
        self.valve.resume(Reason.NO_PEER_YET)
        self._first_packet()

    def _relay(self, side: ServerSide, initial: bytes) -> None:
        server = side.server
        self.server = server
        self.server_side = side
        self._out = side.transport
        side.relaying(self.transport)
        self.proxy.attach(self, server)
        assert side.transport is not None
        if initial:
            side.transport.write(initial)
            server.bytes_out += len(initial)
        if self._pending:
            side.transport.writelines(self._pending)
            self._pending.clear()
        self._connecting = False
        assert self.valve is not None
        self.valve.resume(Reason.NO_PEER_YET)

    def _first_packet_timeout(self) -> None:
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
            self.proxy.remember_key(key, self.server)

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
    def __init__(self, client: ClientSession, server: Server, ssl_probe: bool) -> None:
        self.client = client
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.watcher: BackendKeyWatcher | None = BackendKeyWatcher()
        self._out: asyncio.Transport | None = None  # the client's transport, once only relaying
        self._client_transport: asyncio.Transport | None = None
        self._ssl_probe = ssl_probe  # the first byte answers an SSLRequest: 'S' or 'N'

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
