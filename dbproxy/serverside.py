"""A relayed session's server connection: the first byte (an answer to the
first packet, or to a forwarded SSLRequest), then the server's first messages
watched for BackendKeyData, then bytes straight to the client."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from proxycore.flow import HalfClose, Reason, Valve, bound_writes
from proxycore.servers import Server

from .pgwire import BackendKeyWatcher


class RelayedClient(Protocol):
    """What a server connection needs of its relayed session (dbproxy/session.py)."""

    transport: asyncio.Transport | None
    valve: Valve | None
    closed: bool
    ends: HalfClose

    @property
    def server_side(self) -> ServerSide | None: ...
    def holds(self, side: ServerSide) -> bool: ...
    def server_answered(self, side: ServerSide) -> None: ...
    def ssl_answer(self, side: ServerSide, answer: bytes) -> None: ...
    def write(self, data: bytes) -> None: ...
    def key_seen(self, key: tuple[int, int]) -> None: ...
    def close(self) -> None: ...
    def close_both(self) -> None: ...


class ServerSide:
    def __init__(self, client: RelayedClient, server: Server) -> None:
        self.client = client
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.watcher: BackendKeyWatcher | None = BackendKeyWatcher()
        self._out: asyncio.Transport | None = None  # the client's transport, once only relaying
        self._client_transport: asyncio.Transport | None = None
        self._ssl_probe = False  # the first byte answers an SSLRequest: 'S' or 'N'
        self._owes_answer = False  # sent a first packet, no byte back yet
        # dbproxy's own SSLRequest (server_ssl), answered before anything else
        self.tls_answer: asyncio.Future[bytes] | None = None

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
        answer = self.tls_answer
        if answer is not None:
            if not answer.done():
                answer.set_result(data[:1])
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

    def upgraded(self, transport: asyncio.Transport) -> None:
        """TLS to the server is on (server_ssl): this is the transport from now."""
        self.transport = transport
        self.valve = Valve(transport)
        bound_writes(transport)

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
        answer = self.tls_answer
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionError("the server closed before answering"))
        client = self.client
        if client.holds(self):
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
