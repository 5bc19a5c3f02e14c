"""Reading requests off a client connection: the first layer of ClientConnection
(lb/client.py), over Downstream (its writing half).

Requests are parsed with httptools (llhttp), fed a part at a time so that lb
knows where each request starts and ends before llhttp does (see ``_read``):
a pipelined request's version read as 1.1, a chunk's size refused before its
bytes arrive, a request begun only once its whole head has been read. Every
wait on the client has a limit: the head (slowloris), the body, keep-alive idle.
"""

from __future__ import annotations

import logging
from typing import Final

import httptools

from proxycore.compiled import is_compiled
from proxycore.deadline import Deadline

from . import plain_request
from .downstream import Downstream
from .exchange import Exchange
from .framing import ChunkedBody, as_http11, escape_request_line, head_end
from .heads import BadRequest
from .plain_request import scan
from .request_head import RequestInfo, new_request_id
from .response_head import error_response
from .state import PLAIN, ClientSide, LbState

log = logging.getLogger("lb")

# lb/plain_request.py's byte loop pays only compiled; interpreted, llhttp (C)
# reads a head for less (as lb.plain for responses, lb/upstream.py).
SCAN_REQUEST: Final = is_compiled(plain_request)


# What the connection waits on the client for (RequestReader._waiting).
WAIT_NOTHING: Final = 0
WAIT_HEAD: Final = 1  # the rest of a head: timeouts.client_header
WAIT_BODY: Final = 2  # the next bytes of a body: timeouts.client_body
WAIT_IDLE: Final = 3  # the next request: timeouts.client_keepalive


class RequestReader(Downstream):
    def __init__(self, lb: LbState, side: ClientSide = PLAIN) -> None:
        super().__init__(lb.loop, lb.config.timeouts.lingering, side.https, side.status_line_end)
        self.lb = lb
        self.side = side  # of the listener it came in on
        # llhttp, made when a head is not plain (lb/plain_request.py reads the
        # others): an idle connection holds no parser
        self.parser: httptools.HttpRequestParser | None = None
        # One timer for the one wait on the client at a time (``_waiting``: the
        # head, the body, or keep-alive idle); moving it later costs a float
        # store (see proxycore/deadline.py), and an idle connection holds one.
        self._timer = Deadline(lb.loop, self._timed_out_waiting)
        self._waiting = WAIT_NOTHING
        # the requests read and not yet answered, in order (rarely more than one,
        # and a list costs an idle connection a tenth of a deque); the one tunnelling
        self.queue: list[Exchange] = []
        self.tunnel: Exchange | None = None
        self._current: Exchange | None = None  # the request whose body is being read
        self._in_head = False
        self._reading_body = False
        self._url = b""
        # the head being read, gathered header by header; made at its first byte
        self._request: RequestInfo | None = None
        self._known_host = b""  # the last head's Host, checked (RequestInfo's known_host)
        self._head_size = 0
        self._headers = 0  # header lines of the head being read
        self._rejected: bytes | None = None  # an error answer waiting for the response before it
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
        self._dropped = False  # bytes came after it, unread: the close lingers
        # The body being read belongs to a head lb/plain_request.py read: it goes
        # to the exchange directly (llhttp never saw the head).
        self._scanned = False

    def _reject(self, exc: BadRequest) -> None:
        """Refuse the request being read with ``exc`` (ClientConnection's)."""
        raise NotImplementedError

    def _head_read(self, info: RequestInfo, method: bytes, target: bytes, http11: bool) -> None:
        """A whole head, checked: queue its exchange (ClientConnection's)."""
        raise NotImplementedError

    # -- asyncio.Protocol ----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self._rejected is not None or self.closed or (self._last and self._at_start):
            # (after a request that ends the connection, nothing more is read)
            self._dropped = True
            return
        if self._reading_body:
            self._wait(WAIT_BODY, self.lb.config.timeouts.client_body)
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
        if self._in_head and not self.closed and not self.queue and self._waiting != WAIT_HEAD:
            # From its first byte the whole head must come within client_header.
            self._wait(WAIT_HEAD, self.lb.config.timeouts.client_header)

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
                self._dropped = True
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
            part = data if pos == 0 and stop == n else data[pos:stop]
            if self._scanned:
                self.on_body(part)
                if ends:
                    self._scanned = False
                    self.on_message_complete()
            else:
                self._feed(part)
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
        if start and SCAN_REQUEST and not self._head_tail:
            end = self._scan_head(data, pos)
            if end >= 0:
                return end
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

    def _scan_head(self, data: bytes, pos: int) -> int:
        """Read a plain head at ``pos`` in one pass (lb/plain_request.py) instead of
        through llhttp's callbacks; where it ends, or -1 (nothing read) when it is
        not one."""
        lb = self.lb
        limits = lb.config.limits
        info = RequestInfo(known_host=self._known_host, watch=lb.watch)
        end, method, target = scan(
            data, pos, info, limits.max_header_bytes, limits.max_headers, lb.max_body_bytes
        )
        if end < 0:
            return -1
        self._at_start = False
        self._head_read(info, method, target, True)
        if self._body_left:
            self._scanned = True
        else:
            self.on_message_complete()
            self._begin_next()  # no body to look at first
        return end

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
                self._wait(WAIT_HEAD, self.lb.config.timeouts.client_header)

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

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        parser.feed_data(data)

    def _restart_head(self) -> None:
        """Read the next bytes as the start of a request, with a fresh parser."""
        self.parser = None
        self._at_start = True
        self._in_head = False
        self._url = b""
        self._request = None
        self._head_tail = b""
        self._body_left = 0
        self._scanned = False
        self._chunks = None

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
            self._request = RequestInfo(known_host=self._known_host, watch=self.lb.watch)
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
        info = self._request
        if info is not None:  # (always: on_url began the head)
            info.add(name, value)

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.request_body(body)

    def on_message_complete(self) -> None:
        self._at_start = True
        ex = self._current
        self._current = None
        if self._reading_body:
            self._reading_body = False
            self._stop_waiting(WAIT_BODY)  # now waiting on an upstream, not on the client
        if ex is not None:
            ex.request_body_end()

    # -- the limits on waiting for the client ------------------------------------------
    def _wait(self, what: int, seconds: float) -> None:
        """Wait on the client for ``what`` (WAIT_HEAD, WAIT_BODY, WAIT_IDLE) at most ``seconds``
        from now: the one wait the connection has."""
        self._waiting = what
        self._timer.after(seconds)

    def _wait_until(self, what: int, at: float) -> None:
        """``_wait`` for a caller that has read the clock."""
        self._waiting = what
        self._timer.at(at)

    def _stop_waiting(self, what: int) -> None:
        if self._waiting == what:
            self._waiting = WAIT_NOTHING
            self._timer.cancel()

    def _stop_timers(self, for_good: bool) -> None:
        self._waiting = WAIT_NOTHING
        if for_good:
            self._timer.stop()
            if self._linger is not None:
                self._linger.stop()
        else:
            self._timer.cancel()

    def _timed_out_waiting(self) -> None:
        what, self._waiting = self._waiting, WAIT_NOTHING
        if self.closed:
            return
        if what == WAIT_HEAD and self._in_head:
            self._timed_out("request head")
        elif what == WAIT_BODY and self._reading_body:
            self._timed_out("request body")
        elif what == WAIT_IDLE and not self.queue and not self._in_head and self.tunnel is None:
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
