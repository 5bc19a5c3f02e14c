"""The client side of lb: one protocol object per client connection (asyncio's
Protocol methods without its base class: see proxycore.compiled.protocol_factory).

Requests are parsed with httptools and answered strictly in order: a pipelined
request waits (with reading paused) until the one before it is answered. Every
wait on the client has a limit: the head (slowloris), the body, keep-alive idle.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from proxycore.deadline import Deadline
from proxycore.flow import Reason, Valve, bound_writes, unconnected_write

from .exchange import Exchange
from .framing import ChunkedBody, head_end
from .heads import (
    BadRequest,
    RequestInfo,
    as_http11,
    error_response,
    escape_request_line,
    new_request_id,
    origin_form,
)

if TYPE_CHECKING:
    from .app import Balancer

log = logging.getLogger("lb")


class ClientConnection:
    def __init__(self, lb: Balancer) -> None:
        self.lb = lb
        self.transport: asyncio.Transport | None = None
        self.valve: Valve = None  # type: ignore[assignment]  # set in connection_made
        self._new_parser()
        self._send: Callable[[bytes], None] = unconnected_write
        # One timer per kind of wait: each only ever moves later, so re-arming it
        # costs a float store (see proxycore/deadline.py).
        self._head_timer = Deadline(lb.loop, self._head_timeout)
        self._body_timer = Deadline(lb.loop, self._body_timeout)
        self._idle_timer = Deadline(lb.loop, self._idle_timeout)
        self.client_ip = b"-"
        self.queue: collections.deque[Exchange] = collections.deque()
        self.tunnel: Exchange | None = None
        self.closed = False
        self._current: Exchange | None = None  # the request whose body is being read
        self._in_head = False
        self._reading_body = False
        self._url = b""
        self._request = RequestInfo()  # the head being read, gathered header by header
        self._head_size = 0
        self._headers = 0  # header lines of the head being read
        # the client shut its side: the connection closes after the last response
        self.done_sending = False
        self._rejected: bytes | None = None  # an error answer waiting for the response before it
        self._corked = False
        self._out: list[bytes] = []
        self._at_start = True  # the next byte the parser sees begins a request
        self._line = b""  # the first bytes of a request line not yet whole
        # Where the request being read ends (see _read): the bytes of its
        # Content-Length body still to come, or its chunked framing; the last
        # bytes of a head not yet ended (its blank line may straddle reads).
        self._body_left = 0
        self._chunks: ChunkedBody | None = None
        self._head_tail = b""
        self._starting: Exchange | None = None  # its head is read; it begins once checked
        self._last = False  # a request that ends the connection has been read
        self._linger: Deadline | None = None  # closed by lb, draining what the client sends

    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport = cast(asyncio.Transport, transport)
        self._send = transport.write
        self.valve = Valve(transport)
        lb = self.lb
        lb.metrics.client_total += 1
        if lb.metrics.client_active >= lb.config.limits.max_client_connections:
            lb.metrics.client_refused += 1
            self.closed = True
            transport.abort()
            return
        lb.metrics.client_active += 1
        lb.clients.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        # TCP_NODELAY: uvloop sets it on every TCP transport (tests/test_proxycore_loop.py).
        bound_writes(transport)
        self._head_timer.after(lb.config.timeouts.client_header)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self._rejected is not None or self.closed or (self._last and self._at_start):
            return  # (after a request that ends the connection, nothing more is read)
        if self._reading_body:
            self._body_timer.after(self.lb.config.timeouts.client_body)
        if self._line:
            data = self._line + data
            self._line = b""
        try:
            self._read(data)
        except BadRequest as refused:
            self._reject(refused)
        except httptools.HttpParserError as malformed:
            # httptools wraps what a callback raised: our own refusals come out as the cause
            cause = malformed.__cause__ or malformed.__context__
            if isinstance(cause, BadRequest):
                self._reject(cause)
            else:
                self._reject(BadRequest(400, "bad_request", f"malformed request: {malformed}"))
        if self._in_head and not self.closed and not self.queue and not self._head_timer.armed:
            # From its first byte the whole head must come within client_header.
            self._head_timer.after(self.lb.config.timeouts.client_header)

    def _read(self, data: bytes) -> None:
        """Feed llhttp ``data`` a part at a time: a head up to its blank line,
        then its body up to where its framing ends it, then the next head.
        Each turn of the loop consumes bytes or ends the loop: nothing is fed
        again but one request line made HTTP/1.1 (``_feed_head``), and nothing
        here recurses. Knowing where each request starts is what lets a
        pipelined request's version be read as 1.1, a chunk's size be refused
        before its bytes arrive, and a request begin only once llhttp has read
        its whole head (it objects to some heads only at their end)."""
        n = len(data)
        pos = 0
        while pos < n:
            if self.tunnel is not None:
                self.tunnel.tunnel_from_client(data[pos:])
                return
            if self._rejected is not None or self.closed or (self._last and self._at_start):
                return
            chunks = self._chunks
            if chunks is not None:
                stop = chunks.scan(data, pos)
                ends = chunks.done
            elif self._body_left > 0:
                stop = pos + min(self._body_left, n - pos)
                self._body_left -= stop - pos
                ends = self._body_left == 0
            else:
                pos = self._read_head(data, pos, n)
                continue
            # The request whose head came last begins once its body's framing
            # has been found sound as far as this read goes.
            self._begin_next()
            self._feed(data if pos == 0 and stop == n else data[pos:stop])
            if ends:
                self._chunks = None
                if not self._at_start and not self.closed:
                    # llhttp did not end the message where its framing did
                    raise BadRequest(400, "bad_request", "the request body's framing is ambiguous")
            pos = stop
        self._begin_next()

    def _read_head(self, data: bytes, pos: int, n: int) -> int:
        """Feed the head part of ``data`` from ``pos``: up to the end of the head
        when it is in this read, else all of it (a request line not whole yet is
        held instead). Returns where the part ended."""
        start = self._at_start  # a request line begins at pos (or blank lines before one)
        tail, self._head_tail = self._head_tail, b""
        end = self._head_end(data, pos, tail)
        if end < 0:
            if start and data.find(b"\n", pos) < 0:
                self._hold_line(data[pos:] if pos else data)
                return n
            stop = n
        else:
            stop = end
        part = data if pos == 0 and stop == n else data[pos:stop]
        if start and not part.isascii():
            part = escape_request_line(part)
        try:
            part = self._feed_head(part, start)
        except httptools.HttpParserUpgrade as upgrade:
            ex = self.queue[-1] if self.queue else None
            if ex is None or ex.info.upgrade is None:
                raise BadRequest(400, "bad_request", "an upgrade lb was not asked for") from None
            # From here on the client's bytes belong to the tunnel; they wait in
            # the exchange until the upstream agrees to switch (101), or are read
            # as the next requests if it refuses.
            self._begin_next()
            self.tunnel = ex
            self._stop_timers(for_good=False)
            tail = part[upgrade.args[0] :] + data[stop:]
            if tail:
                ex.tunnel_from_client(tail)
            return n
        if end < 0:
            self._head_tail = (tail + part)[-3:]
            if self._in_head and self._no_version(part):
                raise BadRequest(400, "bad_request", "HTTP/0.9 (a request line without a version)")
        elif self._chunks is None and self._body_left == 0:
            self._begin_next()  # no body to look at first
        return stop

    @staticmethod
    def _head_end(data: bytes, pos: int, tail: bytes) -> int:
        """The index just past the blank line that ends the head being read, or
        -1 when it is not in this read (framing.head_end); the blank line may
        have begun in the reads before, whose last bytes are ``tail``."""
        if tail and pos == 0:
            at = head_end(tail + data[:3], 0)
            if at >= 0:
                return at - len(tail)
        return head_end(data, pos)

    def _feed_head(self, part: bytes, start: bool) -> bytes:
        """Feed a head part; what llhttp read is returned: ``part``, or ``part``
        with its request line's version made HTTP/1.1 (llhttp knows 1.0 and 1.1
        only; RFC 9112 2.3: a higher 1.x is 1.1), fed once more to a fresh
        parser. A second failure is the client's; nothing is fed a third time."""
        try:
            self._feed(part)
            return part
        except httptools.HttpParserError as malformed:
            if not start or "HTTP version" not in str(malformed) or malformed.__context__:
                raise
            again = as_http11(part.lstrip(b"\r\n"))  # BadRequest for another major
            if again is None:
                raise
        self._restart_head()
        self._feed(again)
        return again

    def _hold_line(self, line: bytes) -> None:
        """A request line not whole at the end of a read: held until it is (its
        raw UTF-8 is escaped and its version read as a whole line)."""
        if len(line) > self.lb.config.limits.max_header_bytes:
            raise BadRequest(414, "uri_too_long", "the request line is too long")
        self._line = line
        if not self._in_head:
            self._in_head = True  # a head has begun: client_header runs from now
            if not self.queue:
                self._idle_timer.cancel()
                self._head_timer.after(self.lb.config.timeouts.client_header)

    def _begin_next(self) -> None:
        """Begin the request whose head was read last, when it is first in line."""
        ex = self._starting
        if ex is not None:
            self._starting = None
            if not ex.finished:
                ex.begin(ex.started)

    def _no_version(self, data: bytes) -> bool:
        """Whether the head being read is an HTTP/0.9 request line (no version):
        llhttp takes one and waits for headers that never come. Only its request
        line has been read (no header yet) and the read ends with that line, which
        ends with the target where a version should be."""
        url = self._url
        return (
            bool(url)
            and self._head_size == len(url)
            and data.endswith(b"\n")
            and data.rstrip(b"\r\n").endswith(b" " + url)
        )

    def _new_parser(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        # Bound once per parser, not looked up per call (compiled: a direct call).
        self._feed = self.parser.feed_data

    def _restart_head(self) -> None:
        """Read the next bytes as the start of a request, with a fresh parser."""
        self._new_parser()
        self._at_start = True
        self._in_head = False
        self._url = b""
        self._request = RequestInfo()
        self._head_tail = b""
        self._body_left = 0
        self._chunks = None

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.tunnel_open:
            return tunnel.tunnel_eof_from_client()
        if self.closed:
            return None  # lingering (see close): the client has closed too, so does lb
        # The client sends nothing more, but what it sent whole is still answered
        # (as HAProxy does; nginx drops it): the connection closes after the
        # last response. A body cut short can never be whole: refused.
        self.done_sending = True
        if self._reading_body:
            self._reject(BadRequest(400, "bad_request", "the client ended before the request body"))
        return True if self.queue and not self.closed else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
        if self in self.lb.clients:
            self.lb.clients.discard(self)
            self.lb.metrics.client_active -= 1
        self._stop_timers(for_good=True)
        for ex in self.queue:
            ex.client_gone()
            self.lb.metrics.in_flight -= 1
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.client_gone()
        self.lb.client_closed()

    def pause_writing(self) -> None:
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.upstream is not None and ex.upstream.valve is not None:
            ex.upstream.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.upstream is not None and ex.upstream.valve is not None:
            ex.upstream.valve.resume(Reason.PEER_BUFFER_FULL)

    # -- httptools callbacks ---------------------------------------------------------
    # No on_message_begin: every request has a target, so the first on_url marks
    # the start of a head, and httptools skips a callback it is not given.
    def on_url(self, url: bytes) -> None:
        if self._at_start:
            if self._body_left or self._chunks is not None:
                # llhttp ended a body before its framing did (see _read)
                raise BadRequest(400, "bad_request", "the request body's framing is ambiguous")
            # A head has begun. The keep-alive idle timer is left armed: when it
            # fires it finds a head or a request in progress and does nothing.
            self._at_start = False
            self._in_head = True
            self._head_size = 0
            self._headers = 0
        # a target split over reads comes in pieces; compiled, `+=` on bytes is a
        # generic call where this is a direct one
        self._url = url if not self._url else self._url + url
        self._head_size += len(url)
        if self._head_size > self.lb.config.limits.max_header_bytes:
            raise BadRequest(414, "uri_too_long", "the request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._chunks is not None:
            return  # a trailer field: dropped, as nginx does (ChunkedBody bounds their size)
        limits = self.lb.config.limits
        self._head_size += len(name) + len(value) + 4
        self._headers += 1
        if self._head_size > limits.max_header_bytes:
            raise BadRequest(
                431, "header_too_large", f"request head over {limits.max_header_bytes} bytes"
            )
        if self._headers > limits.max_headers:
            raise BadRequest(
                431, "header_too_large", f"more than {limits.max_headers} header lines"
            )
        self._request.add(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        info = self._request
        # for the next head, whatever becomes of this one; its Host (checked) is
        # most likely the next head's too
        self._request = RequestInfo(known_host=info.host)
        # llhttp keeps an HTTP/1.0 connection alive only when a Connection header
        # asks: keep-alive without one means HTTP/1.1, and spares
        # get_http_version(), which formats a str (a tenth of a microsecond).
        if parser.should_keep_alive() and not info.has_connection_header:
            http11 = True
        else:
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                if version.startswith("0."):
                    raise BadRequest(400, "bad_request", f"HTTP/{version}: lb speaks HTTP/1.x")
                raise BadRequest(
                    505, "http_version_not_supported", f"HTTP/{version}: lb speaks HTTP/1.x"
                )
            http11 = version == "1.1"
        method = parser.get_method()
        target = self._url
        if not target.startswith(b"/") or method == b"CONNECT" or method == b"TRACE":
            target = origin_form(method, target, info)
        info.finish(http11, self.lb.config.limits.max_body_bytes)
        self._last = info.close
        ex = Exchange(self, method, target, info, http11)
        self._url = b""
        self._current = ex
        self.queue.append(ex)
        self.lb.metrics.in_flight += 1
        self._head_timer.cancel()
        if info.upgrade is None:  # (an upgrade's bytes after its head are the tunnel's)
            if info.chunked:
                limits = self.lb.config.limits
                self._chunks = ChunkedBody(limits.max_body_bytes, limits.max_header_bytes)
            elif info.content_length:
                self._body_left = info.content_length
        if not ex.body_done:
            self._reading_body = True
            self._body_timer.after(self.lb.config.timeouts.client_body)
        if len(self.queue) == 1:
            self._starting = ex  # begun by _read once llhttp has read the whole head
        else:
            self.valve.pause(Reason.WAITING_TURN)

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.request_body(body)

    def on_message_complete(self) -> None:
        self._at_start = True
        ex = self._current
        self._current = None
        if self._reading_body:
            self._reading_body = False
            self._body_timer.cancel()  # now waiting on an upstream, not on the client
        if ex is not None:
            ex.request_body_end()

    # -- writing -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self._send(data)

    def write_parts(self, parts: list[bytes]) -> None:
        """Write what ``parts`` joined make: while corked they join what else the
        read brings (a response head and its body leave in one join and one send)."""
        if self._corked:
            self._out += parts
        else:
            self.write(b"".join(parts))

    def cork(self) -> None:
        """Hold writes until uncork: what one upstream read produces leaves in one send."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()  # the list is kept: one fewer allocation per response
            if self.transport is not None and not self.closed:
                self._send(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self, linger: bool = True) -> None:
        if self._corked:
            self.uncork()
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        if not linger or self.done_sending or not transport.can_write_eof():
            transport.close()
            return
        # A lingering close (nginx's lingering_close): lb's FIN follows the
        # answer, and what the client still sends (a body lb refused, requests
        # pipelined behind the last) is read and dropped until the client
        # closes too, for timeouts.lingering at most. Closed with bytes unread,
        # the socket would send a reset, and a reset can cost the client the
        # answer it has not read yet.
        transport.write_eof()
        self.valve.release()
        self._linger = Deadline(self.lb.loop, self._linger_over)
        self._linger.after(self.lb.config.timeouts.lingering)

    def _linger_over(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def last_answer(self, ex: Exchange) -> bool:
        """Whether the connection closes after ``ex``'s response, so its head says
        so: lb is stopping or the client has ended its side, and nothing is
        queued behind it. (Requests queued behind are answered first.)"""
        return (
            (self.lb.draining or self.done_sending) and self.queue[-1] is ex and not self._in_head
        )

    def start_tunnel(self, ex: Exchange) -> None:
        self.tunnel = ex
        self._stop_timers(for_good=False)
        self.valve.resume(Reason.WAITING_TURN)  # what was held went through
        if self.done_sending:
            ex.tunnel_eof_from_client()  # the client had ended its side already

    def _stop_timers(self, for_good: bool) -> None:
        for timer in (self._head_timer, self._body_timer, self._idle_timer):
            if for_good:
                timer.stop()
            else:
                timer.cancel()
        if for_good and self._linger is not None:
            self._linger.stop()

    def exchange_finished(self, ex: Exchange, keep_alive: bool, abort: bool, now: float) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
            self.lb.metrics.in_flight -= 1
        if ex.tunnel_open:
            return
        held = self._upgrade_refused(ex) if self.tunnel is ex else None
        if abort:
            if self.transport is not None and not self.closed:
                self.closed = True
                self.transport.abort()
            return
        if self._rejected is not None and not self.queue:
            self.write(self._rejected)
            self.close()
            return
        if not keep_alive or (not self.queue and (self.lb.draining or self.done_sending)):
            self.close()
            return
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.valve.resume(Reason.WAITING_TURN)
            nxt.begin(now)
            return
        self.valve.resume(Reason.WAITING_TURN)
        timeouts = self.lb.config.timeouts
        if self._in_head:
            self._head_timer.after(timeouts.client_header)
        else:
            self._idle_timer.at(now + timeouts.client_keepalive)
        if held:
            self.data_received(held)

    def _upgrade_refused(self, ex: Exchange) -> bytes:
        """The upstream answered an upgrade request without switching: the
        connection is HTTP again. llhttp stays in its upgrade state, so a fresh
        parser reads what the client sent meanwhile (returned) as the next requests."""
        self.tunnel = None
        held = b"".join(ex.tunnel_buffer) if ex.tunnel_buffer else b""
        ex.tunnel_buffer = None
        self._restart_head()
        return held

    # -- refusals ------------------------------------------------------------------------
    def _reject(self, exc: BadRequest) -> None:
        self._starting = None
        current = self._current
        # The refused request's own id when it has one (its head was read), so the
        # log line and the client's answer name the same request.
        request_id = current.request_id if current is not None else new_request_id()
        self._log_refusal(exc, request_id)
        answer = error_response(exc.status, exc.code, exc.message, request_id, close=True)
        self.valve.pause(Reason.WAITING_TURN)
        if current is not None and self.queue and current is self.queue[0]:
            # The bad bytes are in the body of the request being served: its
            # upstream connection is cut mid-body, so the upstream never sees a
            # whole request, and the client hears why at once.
            self._reading_body = False
            current.fail(exc.status, exc.code, exc.message)
            self.close()
            return
        if current is not None and current in self.queue:
            # Pipelined behind another: dropped before anything of it is sent.
            self.queue.remove(current)
            self.lb.metrics.in_flight -= 1
            current.client_gone()
        if self.queue and not self.queue[0].finished:
            self._rejected = answer  # after the response before it, in order
            return
        self.write(answer)
        self.close()

    def _log_refusal(self, exc: BadRequest, request_id: bytes) -> None:
        """The one line every refused request leaves, whenever it was refused."""
        self.lb.metrics.bad_requests += 1
        log.info(
            "refused a request from %s: %d %s (request id %s)",
            self.client_ip.decode(),
            exc.status,
            exc.message,
            request_id.decode(),
        )

    def refuse_body(self, ex: Exchange) -> None:
        """A chunked body grew past max_body_bytes."""
        limit = self.lb.config.limits.max_body_bytes
        exc = BadRequest(413, "payload_too_large", f"request body over {limit} bytes")
        self._log_refusal(exc, ex.request_id)
        self._reading_body = False
        ex.fail(exc.status, exc.code, exc.message)
        self.close()

    def _head_timeout(self) -> None:
        if self._in_head and not self.closed:
            self._timed_out("request head")

    def _body_timeout(self) -> None:
        if self._reading_body and not self.closed:
            self._timed_out("request body")

    def _idle_timeout(self) -> None:
        if not self.queue and not self._in_head and self.tunnel is None:
            self.close(linger=False)  # keep-alive idle: nothing unread, nothing to answer

    def _timed_out(self, what: str) -> None:
        log.info("closing %s: %s not received in time", self.client_ip.decode(), what)
        if self.queue and self.queue[0].answered_client:
            self.transport.abort()  # type: ignore[union-attr]
            return
        if self.queue:
            self.queue[0].fail(408, "request_timeout", f"the {what} did not arrive in time")
        else:
            self.write(
                error_response(
                    408,
                    "request_timeout",
                    f"the {what} did not arrive in time",
                    new_request_id(),
                    close=True,
                )
            )
        self.close()

    def drain(self) -> None:
        """SIGTERM: a busy connection closes after its last response (which says
        Connection: close); an idle one after timeouts.shutdown_idle more of
        idleness, a request meanwhile answered with Connection: close. Closed at
        once, an idle connection would race the request its client may be
        sending on it: that request would get no answer at all."""
        if not self.queue and not self._in_head and self.tunnel is None:
            timeouts = self.lb.config.timeouts
            self._idle_timer.after(min(timeouts.shutdown_idle, timeouts.client_keepalive))
