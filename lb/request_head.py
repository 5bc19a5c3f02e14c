"""The request head: checked against smuggling as the parser reads it
(RequestInfo), and rewritten for the server (hop-by-hop headers out,
X-Forwarded-* and X-Request-ID in, framing as lb forwards the body)."""

from __future__ import annotations

import os
import re
from typing import Final

from .heads import (
    HOP_BY_HOP,
    PLAIN_CONNECTION_TOKENS,
    BadRequest,
    Header,
    add_line,
    connection_tokens,
    parts_without,
    rule_name,
)

_REBUILT_REQUEST: Final = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
_REQUEST_LINE_END: Final = b" HTTP/1.1\r\n"
_XFF_NAME: Final = b"X-Forwarded-For: "
_PROTO_AND_FORWARDED_HOST: Final = b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
_PROTO_AND_HOST: Final = b"\r\nX-Forwarded-Proto: http\r\nHost: "
_HTTPS_AND_FORWARDED_HOST: Final = b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: "
_HTTPS_AND_HOST: Final = b"\r\nX-Forwarded-Proto: https\r\nHost: "
_REQUEST_ID_END: Final = b"\r\n\r\n"

# Headers a client cannot make hop-by-hop by naming them in Connection: what lb
# frames and routes by (Host, Content-Length, Transfer-Encoding) and what it sets
# itself. `Connection: keep-alive, Host` would otherwise reach the backend with
# no Host at all (nginx ignores the list; HAProxy keeps Host).
_NOT_HOP_BY_HOP: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
# What a Host value may hold (RFC 9110 7.2: uri-host [":" port]; reg-name,
# IPv4 or an IP-literal): deleted from a value, a valid one leaves nothing.
_HOST_CHARS: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]"
)
# An absolute-form target's host, as nginx reads one: a name or an address,
# no sub-delims (`http://a;b/` is refused by nginx and HAProxy alike).
_AUTHORITY_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:[]"
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_CLOSE_TOKENS: Final[frozenset[bytes]] = frozenset({b"close"})
_KEEP_ALIVE_TOKENS: Final[frozenset[bytes]] = frozenset({b"keep-alive"})


def valid_host(value: bytes, chars: bytes = _HOST_CHARS) -> bool:
    """A Host value (RFC 9110 7.2): a host of ``chars``, then a port of digits if any.

    One name: `a.example:8080`, `[::1]:8080`, `10.0.0.1`; not `a b`, `a@b`,
    `a.ex:mple`, `a:1:2` (an IPv6 address goes in brackets)."""
    if not value or value.translate(None, chars):
        return False
    if value[0] == 91:  # "[": an IP-literal, then ":port" or nothing
        end = value.find(b"]")
        if end < 0 or value.find(b"[", 1) >= 0:
            return False
        port = value[end + 1 :]
        return not port or (port[0] == 58 and (len(port) == 1 or port[1:].isdigit()))
    if value.find(b"]") >= 0:
        return False
    name, colon, port = value.partition(b":")
    return bool(name) and (not colon or not port or (port.isdigit() and len(port) <= 5))


# A client's X-Request-ID is kept when it is visible ASCII and not too long.
_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,200}")


# "00".."ff": the last two hex digits of a request id, looked up, not formatted
_HEX_PAIRS: Final = [b"%02x" % i for i in range(256)]


class _RequestIds:
    """32 hex digits like nginx's $request_id: a random per-process half and a counter.

    Unique without a system call per request (os.urandom would cost one). The
    counter's digits but the last two are formatted once per 256 ids; per id it
    is one concatenation (formatting an int into bytes cost 0.13 µs per request).
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex().encode()
        self._count = int.from_bytes(os.urandom(4), "big") << 8
        self._head = b""

    def next(self) -> bytes:
        count = self._count
        self._count = count + 1
        low = count & 0xFF
        if low == 0 or not self._head:
            self._head = b"%b%014x" % (self._prefix, count >> 8)
        return self._head + _HEX_PAIRS[low]


_REQUEST_IDS: Final = _RequestIds()


def new_request_id() -> bytes:
    # a method of a Final instance: compiled, a direct call, where a callable
    # module-level instance was a globals lookup and a generic call
    return _REQUEST_IDS.next()


class RequestInfo:
    """What the proxy needs to know of a request head, checked: gathered header by
    header as the parser reads them (``add``), checked once the head is whole
    (``finish``). ``RequestInfo(headers, http11, max_body)`` reads a whole list.

    ``known_host``: a Host value already found valid (the one before on the same
    connection, which a client repeats): the same bytes are not checked again
    (the check, a translate() call, was a twentieth of lb's work per request)."""

    __slots__ = (
        "_authority",
        "_connection",
        "_content_lengths",
        "_forwarded",
        "_hosts",
        "_transfer_encodings",
        "captured",
        "chunked",
        "close",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "forwarded",
        "host",
        "known_host",
        "request_id",
        "upgrade",
        "watch",
        "x_forwarded_for",
    )

    def __init__(
        self,
        headers: list[Header] | None = None,
        http11: bool = True,
        max_body: int = 0,
        known_host: bytes = b"",
        watch: frozenset[bytes] | None = None,
    ) -> None:
        self.known_host = known_host
        # The headers some route, rate limit or the access log reads (lowercase
        # names), kept in ``captured``; None (the usual case): nothing is kept.
        self.watch = watch
        self.captured: dict[bytes, bytes] | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.request_id: bytes | None = None
        self.x_forwarded_for: bytes | None = None
        self.host = b""
        self._hosts = 0
        self._authority: bytes | None = None  # an absolute-form target's, which wins over Host
        # The lists of rare headers are made only when one is seen: a plain
        # request allocates none of them.
        self._content_lengths: list[bytes] | None = None
        self._transfer_encodings: list[bytes] | None = None
        self._connection: list[bytes] | None = None
        # Lines that go upstream as they are, between the constants that come
        # before and after them in the head (see upstream_request_head: a join
        # of more than ten parts allocates).
        self._forwarded: list[bytes] = [_REQUEST_LINE_END]
        self.content_length: int | None = None
        self.chunked = False
        self.connection_tokens: frozenset[bytes] | set[bytes] = _NO_TOKENS
        self.forwarded = b""
        self.close = False
        if headers is not None:
            for name, value in headers:
                self.add(name, value)
            self.finish(http11, max_body)

    @property
    def has_connection_header(self) -> bool:
        return self._connection is not None

    def add(self, name: bytes, value: bytes) -> None:
        if self.watch is not None:
            self.capture(name, value)
        lname = rule_name(name)
        if not lname or lname not in _REBUILT_REQUEST:
            add_line(self._forwarded, name, value)
            if lname == b"host":
                if value != self.known_host and not valid_host(value):
                    raise BadRequest(400, "bad_request", "the Host header is not a valid host")
                self.host = value
                self._hosts += 1
        elif lname == b"content-length":
            if self._content_lengths is None:
                self._content_lengths = []
            self._content_lengths.append(value)
        elif lname == b"transfer-encoding":
            if self._transfer_encodings is None:
                self._transfer_encodings = []
            self._transfer_encodings.append(value)
        elif lname == b"connection":
            if self._connection is None:
                self._connection = []
            self._connection.append(value)
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                raise BadRequest(
                    417, "expectation_failed", "only 'Expect: 100-continue' is supported"
                )
            self.expect_continue = True
        elif lname == b"upgrade":
            self.upgrade = value
        elif lname == b"x-request-id":
            if _REQUEST_ID.fullmatch(value):
                self.request_id = value
        elif lname == b"x-forwarded-for":
            self.x_forwarded_for = (
                value if self.x_forwarded_for is None else self.x_forwarded_for + b", " + value
            )

    def capture(self, name: bytes, value: bytes) -> None:
        """Keep a header some rule reads (``watch``)."""
        assert self.watch is not None
        lower = name.lower()
        if lower in self.watch:
            if self.captured is None:
                self.captured = {}
            self.captured.setdefault(lower, value)  # the first, as nginx's $http_name

    def header(self, lname: bytes) -> bytes | None:
        """A watched header's value (``lname`` lowercase), None when absent."""
        return None if self.captured is None else self.captured.get(lname)

    def use_authority(self, authority: bytes) -> None:
        """The target was absolute-form: its authority goes upstream as Host."""
        self._authority = authority

    def settle(
        self, host: bytes, forwarded: bytes, content_length: int, connection: bytes = b""
    ) -> None:
        """``finish`` for a plain head, checked by lb/plain_request.py: HTTP/1.1, one
        Host, no rebuilt header but Content-Length (-1: none) and a Connection of
        ``close`` or ``keep-alive`` alone (b"": none), lines as they came."""
        self.host = host
        self._hosts = 1
        self.forwarded = forwarded
        if content_length >= 0:
            self.content_length = content_length
        if connection:
            self._connection = [connection]
            self.close = connection.lower() == b"close"
            self.connection_tokens = _CLOSE_TOKENS if self.close else _KEEP_ALIVE_TOKENS

    def finish(self, http11: bool, max_body: int) -> None:
        """The head is whole: the checks that need all of it."""
        # The parser (llhttp, strict) already refuses most of these; the checks are
        # repeated here so that the rules do not hang on a parser's build flags.
        content_lengths = self._content_lengths
        transfer_encodings = self._transfer_encodings
        if content_lengths is not None:
            if transfer_encodings is not None:
                raise BadRequest(400, "bad_request", "both Content-Length and Transfer-Encoding")
            if len(set(content_lengths)) > 1:
                raise BadRequest(400, "bad_request", "differing Content-Length headers")
            text = content_lengths[0].strip()
            if not text.isdigit() or len(text) > 18:
                raise BadRequest(400, "bad_request", "Content-Length is not a number")
            self.content_length = int(text)
            if self.content_length > max_body:
                raise BadRequest(413, "payload_too_large", f"request body over {max_body} bytes")
        elif transfer_encodings is not None:
            self.chunked = _chunked_only(transfer_encodings, http11)
        if self._hosts > 1 or (http11 and not self._hosts):
            # (HTTP/1.0 may leave Host out; two are ambiguous in any version)
            raise BadRequest(
                400, "bad_request", "an HTTP/1.1 request needs exactly one Host header"
            )
        connection = self._connection
        forwarded = self._forwarded
        if connection is not None:
            self.connection_tokens = connection_tokens(connection)
            if self.connection_tokens - PLAIN_CONNECTION_TOKENS:
                # Rare: headers named in Connection are hop-by-hop too.
                named = self.connection_tokens - _NOT_HOP_BY_HOP
                forwarded = parts_without(forwarded, named, start=1)
        if self._authority is not None:
            # RFC 9112 3.2.2: with an absolute-form target, Host is the URI's authority.
            forwarded = parts_without(forwarded, {b"host"}, start=1)
            self.host = self._authority
            add_line(forwarded, b"Host", self._authority)
        forwarded.append(_XFF_NAME)
        self.forwarded = b"".join(forwarded)
        self.close = b"close" in self.connection_tokens or (
            not http11 and b"keep-alive" not in self.connection_tokens
        )
        if self.upgrade is not None and b"upgrade" not in self.connection_tokens:
            self.upgrade = None  # an Upgrade header without Connection: upgrade means nothing


def _chunked_only(values: list[bytes], http11: bool) -> bool:
    """A request's Transfer-Encoding: one header, and it says `chunked`.

    lb decodes chunked and nothing else, and sends the body on as chunked; a
    coding before it (`gzip, chunked`) would reach the backend dropped, so it
    is refused (501, as nginx; RFC 9112 6.1), as is any list llhttp and a
    backend might read apart (`,chunked`, `chunked, chunked`, two headers)."""
    if len(values) > 1:
        raise BadRequest(400, "bad_request", "more than one Transfer-Encoding header")
    coding = values[0].strip(b" \t").lower()
    if coding != b"chunked":
        codings = [c.strip(b" \t") for c in coding.split(b",")]
        if not all(codings) or codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
            raise BadRequest(400, "bad_request", "Transfer-Encoding must be chunked")
        shown = values[0].decode("latin-1")[:100]
        raise BadRequest(
            501, "not_implemented", f"Transfer-Encoding {shown!r}: lb takes chunked alone"
        )
    if not http11:
        raise BadRequest(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
    return True


def origin_form(method: bytes, target: bytes, info: RequestInfo) -> bytes:
    """The target to send upstream for one that is not a plain path (the caller
    checks that first: a path is the usual case and costs nothing here).

    Absolute-form (`GET http://a.example/p`) goes on as its path with Host made
    from its authority, as nginx does (RFC 9112 3.2.2: the authority wins over
    Host); `OPTIONS *` goes on as it is; anything else is refused: CONNECT (lb is
    no forward proxy) and TRACE with 405, other targets with 400.
    """
    if method == b"CONNECT":
        raise BadRequest(
            405, "method_not_allowed", "CONNECT is not supported: lb is no forward proxy"
        )
    if method == b"TRACE":
        # as nginx: TRACE echoes a request back, cookies and credentials with it
        # (cross-site tracing), and no backend behind a proxy needs it
        raise BadRequest(405, "method_not_allowed", "TRACE is not allowed")
    if target == b"*" and method == b"OPTIONS":
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(
            400, "bad_request", "the request target must be a path, an http(s) URI or '*'"
        )
    end = len(rest)
    for mark in (b"/", b"?", b"#"):
        at = rest.find(mark)
        if 0 <= at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if not valid_host(authority, _AUTHORITY_CHARS):
        raise BadRequest(400, "bad_request", "the request target's authority is not a valid host")
    info.use_authority(authority)
    if not path.startswith(b"/"):
        path = b"/" + path
    return path


def upstream_request_head(
    method: bytes,
    target: bytes,
    info: RequestInfo,
    request_id: bytes,
    client_ip: bytes,
    default_host: bytes = b"localhost",
    https: bool = False,
) -> bytes:
    """The head sent upstream: always HTTP/1.1 keep-alive, framed as we forward the body.

    An HTTP/1.0 request may come without Host; HTTP/1.1 upstreams require one,
    so it gets ``default_host`` (as nginx sends $proxy_host).
    """
    xff = client_ip if info.x_forwarded_for is None else info.x_forwarded_for + b", " + client_ip
    if info.host:
        host_name = _HTTPS_AND_FORWARDED_HOST if https else _PROTO_AND_FORWARDED_HOST
        host = info.host
    else:
        host_name, host = (_HTTPS_AND_HOST if https else _PROTO_AND_HOST), default_host
    framing = b""
    if info.upgrade is not None:
        framing = b"Connection: upgrade\r\nUpgrade: " + info.upgrade + b"\r\n"
    if info.chunked:
        framing += b"Transfer-Encoding: chunked\r\n"
    elif info.content_length is not None:
        framing += b"Content-Length: %d\r\n" % info.content_length
    # the request id's line end and the blank line, with any framing between
    end = b"\r\n" + framing + b"\r\n" if framing else _REQUEST_ID_END
    # One join of a fixed shape, of ten parts at most (CPython's join allocates
    # its bookkeeping for more): the cheapest way to build it (measured).
    return b"".join(
        (
            method,
            b" ",
            target,
            info.forwarded,  # " HTTP/1.1", the lines, "X-Forwarded-For: "
            xff,
            host_name,
            host,
            b"\r\nX-Request-ID: ",
            request_id,
            end,
        )
    )
