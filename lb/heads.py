"""Request and response heads: validation against smuggling, and the rewrite each
side gets (hop-by-hop headers out, X-Forwarded-* and X-Request-ID in, framing)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Final

from mypy_extensions import i64

Header = tuple[bytes, bytes]

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones we rebuild ourselves.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_REBUILT_REQUEST: Final = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
REBUILT_RESPONSE: Final = HOP_BY_HOP | {b"content-length"}
_REQUEST_LINE_END: Final = b" HTTP/1.1\r\n"
_XFF_NAME: Final = b"X-Forwarded-For: "
_PROTO_AND_FORWARDED_HOST: Final = b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
_PROTO_AND_HOST: Final = b"\r\nX-Forwarded-Proto: http\r\nHost: "
_REQUEST_ID_END: Final = b"\r\n\r\n"


# The header names some rule looks at (the rebuilt ones and Host), as they are
# usually spelled; rule_name finds them by length and a compare, not by a hash
# of each name read (a new bytes object, so hashed afresh every time).
_WATCHED_NAMES: Final = (
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Upgrade",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
    b"Expect",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Request-ID",
)
# By length: the lowercase form of each watched name of that length.
_BY_SIZE: Final = [
    tuple(n.lower() for n in _WATCHED_NAMES if len(n) == size)
    for size in range(max(len(n) for n in _WATCHED_NAMES) + 1)
]
_PLAIN_CONNECTION_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
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


_HIGH_BYTE: Final = re.compile(rb"[\x80-\xff]")


def escape_request_line(data: bytes) -> bytes:
    """Percent-encode bytes >= 0x80 in the first line (the request line) of ``data``.

    `curl 'host/search?first_name=Ив'` sends the target as raw UTF-8, which
    nginx accepts and the strict parser (llhttp) refuses. Escaped, it means the
    same to any server; header values and bodies are left as they are.
    """
    end = data.find(b"\n")
    line, rest = (data, b"") if end < 0 else (data[: end + 1], data[end + 1 :])
    return _HIGH_BYTE.sub(lambda m: b"%%%02X" % m.group()[0], line) + rest


def as_http11(data: bytes) -> bytes | None:
    """``data`` with its first line's version made HTTP/1.1 when it is a higher
    HTTP/1.x (RFC 9112 2.3: a recipient treats it as the highest 1.x it knows);
    None when the line is not of that shape. Another major version is refused
    with 505, as nginx does (HTTP/2 and 3 do not travel in an HTTP/1 request line)."""
    end = data.find(b"\n")
    if end < 0:
        return None
    line_end = end - 1 if end and data[end - 1] == 13 else end
    start, sep, version = data[:line_end].rpartition(b" HTTP/")
    major, dot, minor = version.partition(b".")
    if not sep or not dot or len(major) != 1 or len(minor) != 1:
        return None
    if not (major.isdigit() and minor.isdigit()):
        return None
    if major != b"1":
        raise BadRequest(
            505, "http_version_not_supported", f"HTTP/{version.decode()}: lb speaks HTTP/1.x"
        )
    return start + b" HTTP/1.1" + data[line_end:]


def watched_name(data: bytes, start: i64, end: i64) -> bytes:
    """The lowercase form of the header name ``data[start:end]`` when it is one
    some rule looks at (_WATCHED_NAMES), else b"". Compared in place, in any
    case: no slice, no lower(), no hash; most names are told by their length.

    For names of token characters (the parser's, lb.plain's): ``| 0x20``
    lowercases a letter and maps no other token character onto a letter or '-'.
    """
    size = end - start
    if size >= len(_BY_SIZE):
        return b""
    for lower in _BY_SIZE[size]:
        k: i64 = 0
        while k < size and data[start + k] | 0x20 == lower[k]:
            k += 1
        if k == size:
            return lower
    return b""


def rule_name(name: bytes) -> bytes:
    """watched_name for a whole name."""
    return watched_name(name, 0, len(name))


def _add_line(out: list[bytes], name: bytes, value: bytes) -> None:
    """A header line as four parts of a later join; appended one by one, as
    compiled that allocates nothing (a tuple to extend with would)."""
    out.append(name)
    out.append(b": ")
    out.append(value)
    out.append(b"\r\n")


class BadRequest(Exception):
    """The request is refused before anything is forwarded; ``status`` is what the client gets."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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


def _connection_tokens(values: Sequence[bytes]) -> set[bytes]:
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


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
        "_known_host",
        "_transfer_encodings",
        "chunked",
        "close",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "forwarded",
        "host",
        "request_id",
        "upgrade",
        "x_forwarded_for",
    )

    def __init__(
        self,
        headers: list[Header] | None = None,
        http11: bool = True,
        max_body: int = 0,
        known_host: bytes = b"",
    ) -> None:
        self._known_host = known_host
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
        lname = rule_name(name)
        if not lname or lname not in _REBUILT_REQUEST:
            _add_line(self._forwarded, name, value)
            if lname == b"host":
                if value != self._known_host and not valid_host(value):
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

    def use_authority(self, authority: bytes) -> None:
        """The target was absolute-form: its authority goes upstream as Host."""
        self._authority = authority

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
            self.connection_tokens = _connection_tokens(connection)
            if self.connection_tokens - _PLAIN_CONNECTION_TOKENS:
                # Rare: headers named in Connection are hop-by-hop too.
                named = self.connection_tokens - _NOT_HOP_BY_HOP
                forwarded = _parts_without(forwarded, named, start=1)
        if self._authority is not None:
            # RFC 9112 3.2.2: with an absolute-form target, Host is the URI's authority.
            forwarded = _parts_without(forwarded, {b"host"}, start=1)
            self.host = self._authority
            _add_line(forwarded, b"Host", self._authority)
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
) -> bytes:
    """The head sent upstream: always HTTP/1.1 keep-alive, framed as we forward the body.

    An HTTP/1.0 request may come without Host; HTTP/1.1 upstreams require one,
    so it gets ``default_host`` (as nginx sends $proxy_host).
    """
    xff = client_ip if info.x_forwarded_for is None else info.x_forwarded_for + b", " + client_ip
    if info.host:
        host_name, host = _PROTO_AND_FORWARDED_HOST, info.host
    else:
        host_name, host = _PROTO_AND_HOST, default_host
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


class ResponseInfo:
    """A response head's framing and the lines the client gets, gathered header by
    header as the parser reads them (no list of pairs, no second pass over it),
    then settled by ``finish`` once the head is whole. An upstream connection
    keeps one and fills it again for each head; ``ResponseInfo(headers)`` reads a
    whole list at once."""

    __slots__ = (
        "_chunked",
        "_content_length",
        "_parts",
        "_request_id",
        "_tokens",
        "_upgrade_seen",
        "chunked",
        "content_length",
        "keep_alive",
        "lines",
        "reason",
        "request_id",
        "status",
    )

    def __init__(self, headers: list[Header] | None = None, upgrade: bool = False) -> None:
        # What ``finish`` settles: the digits of Content-Length as the upstream
        # sent them (llhttp has checked them) go to the client as they are,
        # never parsed into an int and formatted back.
        self.content_length: bytes | None = None
        self.chunked = False
        self.request_id = False
        self.lines = b""
        # Set by ``settle`` only (the parser has them for its heads).
        self.status = 0
        self.reason = b""
        self.keep_alive = False
        # What ``add`` gathers for the head being read.
        self._parts: list[bytes] = []
        self._content_length: bytes | None = None
        self._chunked = False
        self._request_id = False
        self._tokens: set[bytes] | None = None
        self._upgrade_seen = False
        if headers is not None:
            for name, value in headers:
                self.add(name, value)
            self.finish(upgrade)

    def add(self, name: bytes, value: bytes) -> None:
        lname = rule_name(name)
        if not lname or lname not in REBUILT_RESPONSE:
            if lname == b"x-request-id":
                self._request_id = True
            _add_line(self._parts, name, value)
        elif lname == b"content-length":
            digits = value
            if not digits.isdigit():  # spares the strip() when there is nothing to strip
                digits = value.strip()
                if not digits.isdigit():
                    raise ValueError(f"Content-Length {value!r} is not a number")
            self._content_length = digits
        elif lname == b"transfer-encoding":
            self._chunked = True
        elif lname == b"connection":
            named = _connection_tokens([value])
            self._tokens = named if self._tokens is None else self._tokens | named
        elif lname == b"upgrade":
            # Kept in its place; only a 101 passes it on (see finish).
            self._upgrade_seen = True
            _add_line(self._parts, name, value)

    def settle(
        self,
        status: int,
        reason: bytes,
        lines: bytes,
        content_length: bytes,
        request_id: bool,
        keep_alive: bool,
    ) -> None:
        """A plain head read whole without the parser (lb.plain, by the same
        rules): what ``finish`` would have settled, and what the parser would
        have said of its status line and keep-alive."""
        self.status = status
        self.reason = reason
        self.lines = lines
        self.content_length = content_length
        self.chunked = False
        self.request_id = request_id
        self.keep_alive = keep_alive

    def finish(self, upgrade: bool) -> None:
        """The head is whole: settle what it says and start afresh for the next
        (``upgrade``: a 101, whose Upgrade header goes to the client)."""
        parts = self._parts
        drop: set[bytes] | None = None
        tokens = self._tokens
        if tokens is not None and tokens - _PLAIN_CONNECTION_TOKENS:
            drop = tokens - {b"upgrade"} if upgrade else set(tokens)
        if self._upgrade_seen and not upgrade:
            drop = {b"upgrade"} if drop is None else drop | {b"upgrade"}
        if drop:
            # Rare: headers named in Connection are hop-by-hop too.
            parts = _parts_without(parts, drop)
        self.lines = b"".join(parts)
        self.content_length = self._content_length
        self.chunked = self._chunked
        self.request_id = self._request_id
        self._parts.clear()  # the list is kept for the next head
        self._content_length = None
        self._chunked = False
        self._request_id = False
        self._tokens = None
        self._upgrade_seen = False


def _parts_without(parts: list[bytes], drop: set[bytes], start: int = 0) -> list[bytes]:
    """Header lines (four parts each, as _add_line puts them, from ``start`` on;
    the parts before it are kept) but those named in ``drop``."""
    out = parts[:start]
    for i in range(start, len(parts), 4):
        if parts[i].lower() not in drop:
            out.extend(parts[i : i + 4])
    return out


def client_response_head(
    status: int,
    reason: bytes,
    info: ResponseInfo,
    *,
    content_length: bytes | None,
    chunked_to_client: bool,
    keep_alive: bool,
    request_id: bytes,
    upgrade: bool = False,
) -> list[bytes]:
    """The head sent to the client, framed for it (HTTP/1.1 keep-alive unless told
    otherwise), as at most nine parts: the client's connection joins them with the
    body read with them (ClientConnection.write_parts), one join of at most ten
    (CPython's join allocates its bookkeeping for more) for the whole response.

    ``content_length``: the digits to send, as in ResponseInfo.content_length.
    """
    parts = [_status_line_start(status), reason, b"\r\n", info.lines]
    # each ending comes without and with the end of an X-Request-ID line before it
    with_id = 0
    if not info.request_id:
        parts.append(b"X-Request-ID: ")
        parts.append(request_id)
        with_id = 1
    if upgrade:
        parts.append(_UPGRADE_END[with_id])
    elif chunked_to_client:
        parts.append((_CHUNKED_END if keep_alive else _CHUNKED_CLOSE_END)[with_id])
    elif content_length is not None:
        parts.append(_LENGTH_NAME[with_id])
        parts.append(content_length)
        parts.append(b"\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n")
    else:
        parts.append((_END if keep_alive else _CLOSE_END)[with_id])
    return parts


def _ends(ending: bytes) -> tuple[bytes, bytes]:
    return ending, b"\r\n" + ending


_UPGRADE_END: Final = _ends(b"Connection: upgrade\r\n\r\n")
_CHUNKED_END: Final = _ends(b"Transfer-Encoding: chunked\r\n\r\n")
_CHUNKED_CLOSE_END: Final = _ends(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
_LENGTH_NAME: Final = _ends(b"Content-Length: ")
_END: Final = _ends(b"\r\n")
_CLOSE_END: Final = _ends(b"Connection: close\r\n\r\n")


# "HTTP/1.1 200 ".. as bytes once, not formatted per response
_STATUS_LINE_STARTS: Final = [b"HTTP/1.1 %d " % code for code in range(600)]


def _status_line_start(status: int) -> bytes:
    return _STATUS_LINE_STARTS[status] if 0 <= status < 600 else b"HTTP/1.1 %d " % status


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    *,
    close: bool,
    retry_after: int | None = None,
) -> bytes:
    """Our own answer (4xx/5xx): JSON with the request id, never a traceback."""
    body = (
        b'{"message": "'
        + message.replace("\\", "\\\\").replace('"', '\\"').encode()
        + b'", "request_id": "'
        + request_id
        + b'", "code": "'
        + code.encode()
        + b'"}'
    )
    head = [
        b"HTTP/1.1 ",
        str(status).encode(),
        b" ",
        REASONS.get(status, b"Error"),
        b"\r\n",
        b"Content-Type: application/json\r\nContent-Length: ",
        str(len(body)).encode(),
        b"\r\n",
        b"X-Request-ID: ",
        request_id,
        b"\r\n",
    ]
    if retry_after is not None:
        head += (b"Retry-After: ", str(retry_after).encode(), b"\r\n")
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


REASONS: Final = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
