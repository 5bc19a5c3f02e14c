"""Connections to upstream servers: the response-side protocol, what it sees of
the exchange it carries (Receiver), and the keep-alive pool."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Final, cast

import httptools

from proxycore.compiled import is_compiled, protocol_factory
from proxycore.deadline import Deadline
from proxycore.flow import Reason, Valve, bound_writes, unconnected_write
from proxycore.servers import Server
from proxycore.tls import client_context

from . import plain
from .downstream import Downstream
from .plain import scan
from .response_head import ResponseInfo
from .settings import PoolConfig, Timeouts, UpstreamTls

# lb.plain's byte loop pays only compiled; interpreted, llhttp (C) reads a
# response faster (scripts/lb_cost.py, interpreted: 16.7 µs a request with the
# scan, 12.0 without).
SCAN_PLAIN: Final = is_compiled(plain)


class Receiver:
    """What an upstream connection sees of the exchange it carries: the calls a
    response makes (its head, its body, its end, a failure, a timeout, a hedge
    due), and the client it is written to. The Exchange (lb/exchange.py) is the
    one subclass: the connection never imports it."""

    client: Downstream
    method: bytes
    timeouts: Timeouts
    # the attempt whose answer the client gets, and a second one racing it
    upstream: UpstreamConnection | None = None
    hedge_conn: UpstreamConnection | None = None
    response_until_close = False  # its body ends when the upstream closes

    def on_interim_response(self, status: int, reason: bytes, info: ResponseInfo) -> None:
        raise NotImplementedError

    def on_switching_protocols(
        self, conn: UpstreamConnection, reason: bytes, info: ResponseInfo
    ) -> bool:
        raise NotImplementedError

    def on_response_head(
        self, status: int, reason: bytes, info: ResponseInfo, upstream_keep_alive: bool
    ) -> bool:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_complete(self, upstream_reusable: bool) -> None:
        raise NotImplementedError

    def upstream_failed(
        self, conn: UpstreamConnection, why: str, *, failure: bool, timeout: bool = False
    ) -> None:
        raise NotImplementedError

    def upstream_timed_out(self, conn: UpstreamConnection, got_first_byte: bool) -> None:
        raise NotImplementedError

    def hedge_due(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def first_byte_from(self, conn: UpstreamConnection) -> bool:
        raise NotImplementedError

    def tunnel_to_client(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_eof_from_upstream(self) -> bool:
        raise NotImplementedError

    def tunnel_closed_by_upstream(self) -> None:
        raise NotImplementedError


class UpstreamConnection:
    """One connection to one server, carrying one exchange at a time."""

    def __init__(self, server: Server, pool: UpstreamPool) -> None:
        self.server = server
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.exchange: Receiver | None = None
        self.closed = False
        self.tunnel = False
        self._new_parser()
        self.send: Callable[[bytes], None] = unconnected_write
        # One timer per kind of wait, each only ever moved later (see proxycore/deadline.py).
        self.first_byte_timer = Deadline(pool.loop, self._first_byte_timeout)
        self.idle_timer = Deadline(pool.loop, self._idle_timeout)
        self.pool_timer = Deadline(pool.loop, self._pool_timeout)
        self.hedge_timer = Deadline(pool.loop, self._hedge_timeout)
        self._reason = b""
        # When the exchange it carries was sent (loop time), for the server's
        # latency (balancing.observe); -1 once that attempt's time is counted.
        self.sent_at = -1.0
        self._head = ResponseInfo()  # the response head being read
        self._done = False
        self._head_only = False
        self._first_byte = False
        self._keep_alive = False
        self._interim = False

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport = cast(asyncio.Transport, transport)
        self.send = transport.write
        self.valve = Valve(transport)
        # TCP_NODELAY: uvloop sets it on every TCP transport (tests/test_proxycore_loop.py).
        bound_writes(transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # An idle connection that speaks is broken (or was never HTTP): drop it.
            self.close()
            return
        self.server.bytes_in += len(data)
        if self.tunnel:
            ex.tunnel_to_client(data)
            return
        if not self._first_byte:
            self._first_byte = True
            self.first_byte_timer.cancel()
            self.hedge_timer.cancel()
            if ex.hedge_conn is not None and not ex.first_byte_from(self):
                return  # a hedge racing this one answered first: this one was closed
            # The usual response, whole in its first read: read without llhttp
            # (which then never saw it: it waits at the start of a message, as
            # after any response). A HEAD's has a length and no body: llhttp's.
            if SCAN_PLAIN and ex.method != b"HEAD":
                body_start = scan(data, self._head)
                if body_start >= 0:
                    self._plain_response(ex, data, body_start)
                    return
        client = ex.client
        client.cork()
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            if self.exchange is ex and self.tunnel:
                ex.tunnel_to_client(data[offset:])
        except httptools.HttpParserError as exc:
            if self.exchange is ex:
                ex.upstream_failed(self, f"invalid response: {exc}", failure=True)
        else:
            if self.exchange is ex:
                if self._done:
                    self._response_done(ex)
                else:
                    # More of the response is due: upstream_idle between its reads.
                    # (A response read whole, the usual case, arms nothing.)
                    self.idle_timer.after(ex.timeouts.upstream_idle)
        finally:
            client.uncork()

    def eof_received(self) -> bool | None:
        if self.tunnel and self.exchange is not None:
            return self.exchange.tunnel_eof_from_upstream()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timers()
        ex = self.exchange
        if ex is None:
            self.pool.forget(self)
            return
        if self.tunnel:
            ex.tunnel_closed_by_upstream()
            return
        if ex.response_until_close and ex.upstream is self:
            # A body delimited by the close of the connection ends here, whole.
            self._response_done(ex)
            return
        ex.upstream_failed(
            self, "connection closed" if exc is None else f"connection lost: {exc}", failure=True
        )

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.valve.resume(Reason.PEER_BUFFER_FULL)

    # -- httptools callbacks -------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        # pieces joined as ClientConnection.on_url joins the target's
        self._reason = reason if not self._reason else self._reason + reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.add(name, value)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        status = self.parser.get_status_code()
        self._interim = status < 200  # 1xx and 101: the response proper is still to come
        reason = self._reason
        self._reason = b""
        head = self._head
        head.finish(upgrade=status == 101)  # settled, and ready for the next head
        if ex is None:
            return
        if 100 <= status < 200 and status != 101:
            ex.on_interim_response(status, reason, head)
            return
        if status == 101:
            self.tunnel = ex.on_switching_protocols(self, reason, head)
            return
        # Read now: llhttp forgets the message's flags once it is complete.
        self._keep_alive = keep_alive = self.parser.should_keep_alive()
        if ex.on_response_head(status, reason, head, keep_alive):
            # HEAD: the head is the whole response, whatever Content-Length says.
            self._done = True
            self._head_only = True

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        if not self._interim:
            self._done = True

    def _plain_response(self, ex: Receiver, data: bytes, body_start: int) -> None:
        """A whole response read by lb.plain into self._head: what the parser's
        callbacks do, in one go."""
        client = ex.client
        client.cork()
        try:
            head = self._head
            self._keep_alive = head.keep_alive
            ex.on_response_head(head.status, head.reason, head, head.keep_alive)
            if self.exchange is ex:  # not retried elsewhere (a passive status)
                if body_start < len(data):
                    ex.on_response_body(data[body_start:])
                self._response_done(ex)
        finally:
            client.uncork()

    # -- life of the connection ------------------------------------------------
    def _response_done(self, ex: Receiver) -> None:
        self.idle_timer.cancel()  # (first_byte_timer was cancelled by the first byte)
        self._done = False
        self._first_byte = False
        if self._head_only:
            # llhttp would wait for the body a HEAD response never has
            self._head_only = False
            self._new_parser()
        ex.on_response_complete(self._keep_alive and not self.closed)

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        # Bound once, not looked up per call (compiled: a direct call).
        self._feed = self.parser.feed_data

    @property
    def answering(self) -> bool:
        """A byte of the response to the exchange it carries has come."""
        return self._first_byte

    def start_exchange(self, ex: Receiver, now: float) -> None:
        self.exchange = ex
        self._first_byte = False
        self._done = False
        self.sent_at = now
        self.first_byte_timer.at(now + ex.timeouts.first_byte)

    def release(self, now: float) -> None:
        """The exchange is over and the connection can carry another: back to the
        pool (closed instead if the server closed it meanwhile)."""
        self.exchange = None
        if not self.closed:
            self.pool.give(self, now)
        else:
            self.close()

    def close(self) -> None:
        self.exchange = None
        self._stop_timers()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        self.exchange = None
        self._stop_timers()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.pool.forget(self)

    def _stop_timers(self) -> None:
        self.first_byte_timer.stop()
        self.hedge_timer.stop()
        self.idle_timer.stop()
        self.pool_timer.stop()

    def _first_byte_timeout(self) -> None:
        if self.exchange is not None and not self.tunnel and not self._first_byte:
            self.exchange.upstream_timed_out(self, False)

    def _idle_timeout(self) -> None:
        if self.exchange is not None and not self.tunnel:
            self.exchange.upstream_timed_out(self, True)

    def _hedge_timeout(self) -> None:
        if self.exchange is not None and not self.tunnel and not self._first_byte:
            self.exchange.hedge_due(self)

    def _pool_timeout(self) -> None:
        if self.exchange is None:
            self.close()  # idle in the pool for too long


class UpstreamPool:
    """Idle keep-alive connections per server, newest first (they are the warmest)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: PoolConfig) -> None:
        self.loop = loop
        self.config = config
        self._idle: dict[Server, list[UpstreamConnection]] = {}
        self._tls: tuple[UpstreamTls, ssl.SSLContext] | None = None

    def tls_for(self, server: Server) -> tuple[ssl.SSLContext | None, str | None]:
        """How to reach ``server`` when the pool speaks TLS to its servers: the
        client context (made again when a reload changed the settings) and the
        name to send and verify; (None, None) in plain HTTP."""
        tls = self.config.tls
        if tls is None:
            return None, None
        if self._tls is None or self._tls[0] != tls:
            self._tls = (tls, client_context(tls.verify, tls.ca_file, tls.min_version))
        return self._tls[1], tls.server_name or server.spec.address.host

    def take(self, server: Server) -> UpstreamConnection | None:
        idle = self._idle.get(server)
        while idle:
            conn = idle.pop()
            # ``closed`` is set when lb closes it and when the server does
            # (connection_lost): no transport.is_closing() call per request
            if not conn.closed:
                conn.pool_timer.cancel()
                return conn
        return None

    def has_idle(self, server: Server) -> bool:
        return bool(self._idle.get(server))

    def give(self, conn: UpstreamConnection, now: float) -> None:
        settings = self.config.keepalive
        idle = self._idle.setdefault(conn.server, [])
        if len(idle) >= settings.max_idle:
            conn.close()
            return
        idle.append(conn)
        conn.pool_timer.at(now + settings.idle_timeout)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.server)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, server: Server, timeout: float) -> UpstreamConnection:
        address = server.spec.address
        context, name = self.tls_for(server)
        _, protocol = await asyncio.wait_for(
            self.loop.create_connection(
                protocol_factory(lambda: UpstreamConnection(server, self)),
                address.host,
                address.port,
                ssl=context,
                server_hostname=name,
            ),
            timeout,
        )
        return cast(UpstreamConnection, protocol)

    def drop(self, server: Server) -> None:
        for conn in self._idle.pop(server, []):
            conn.close()

    def close_all(self) -> None:
        for server in list(self._idle):
            self.drop(server)
