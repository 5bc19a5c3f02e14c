"""The plain request head, read in one pass without the parser.

What a client sends is where request smuggling lives, so llhttp stays the
judge of every request this scan is not sure of. It takes only the plainest
head: a common method, an origin-form target of URI characters, `HTTP/1.1`,
header lines each written `Name: value` (one space, no trailing whitespace),
exactly one valid Host, at most one Content-Length of digits, at most one
Connection that says just `close` or `keep-alive` (as curl, browsers and most
libraries write it), and no other header lb rebuilds or frames by
(Transfer-Encoding, Expect, Upgrade, X-Forwarded-*, X-Request-ID, the
hop-by-hop ones), the whole head in this read and within the head limits.
Everything else, and anything llhttp or RequestInfo would refuse, is -1 and
goes to llhttp exactly as before: the scan can only say yes to a request
llhttp also accepts, never no to one.

What it saves is llhttp's callbacks into Python (a new bytes object, an
argument parse and a call each: the target, every header, the head's end, the
message's end) and the head's lines rebuilt one by one: in the canonical form
the lines lb forwards are the client's bytes, so they are one slice of the
read (three at most: lb writes its own Content-Length and Connection).
tests/test_lb_plain_request.py holds it to llhttp on the edge corpus and on a
hundred thousand mutations of it; docs/lb.md says why the subset is safe.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from .heads import watched_name
from .plain import CLASS, field_end
from .request_head import RequestInfo, valid_host

# The methods taken here, as constants (the scan hands one of these objects
# on, not a new bytes); CONNECT and TRACE are refused elsewhere, others are
# rare enough to leave to llhttp.
_METHODS: Final = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"PATCH", b"OPTIONS")
_LINE_END: Final = b" HTTP/1.1\r\n"
_XFF_NAME: Final = b"X-Forwarded-For: "
# Target bytes: RFC 3986's pchar, "/" and "?" (unreserved, "%", sub-delims,
# ":", "@"). No "#", no controls, no space, no 8-bit byte (lb escapes those
# first), none of the bytes RFC 3986 leaves out ("\"<>\\^`{|}").
_TARGET_CHARS: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/?"
)
_TARGET: Final = bytes(1 if c in _TARGET_CHARS else 0 for c in range(256))
_MAX_LENGTH_DIGITS: Final = 18
_NOTHING: Final = (-1, b"", b"")
# The Connection values taken here (in any case): lowercase.
_CONNECTION_WORDS: Final = (b"close", b"keep-alive")


def _method(data: bytes, start: i64, end: i64) -> bytes:
    """One of _METHODS when ``data[start:end]`` spells it, else b""."""
    size = end - start
    for method in _METHODS:
        if len(method) == size:
            k: i64 = 0
            while k < size and data[start + k] == method[k]:
                k += 1
            if k == size:
                return method
    return b""


def _plain_connection(data: bytes, start: i64, end: i64) -> bool:
    """Whether a Connection value is just `close` or `keep-alive`, in any case."""
    size = end - start
    for word in _CONNECTION_WORDS:
        if len(word) == size:
            k: i64 = 0
            while k < size:
                c = data[start + k]
                if 65 <= c <= 90:  # "A".."Z"
                    c += 32
                if c != word[k]:
                    break
                k += 1
            if k == size:
                return True
    return False


def _without(data: bytes, start: i64, end: i64, a0: i64, a1: i64, b0: i64, b1: i64) -> bytes:
    """``data[start:end]`` less the lines ``[a0, a1)`` and then ``[b0, b1)``, each
    absent when its start is -1 (the second only when the first is)."""
    if a0 < 0:
        return data[start:end]
    if b0 < 0:
        return data[start:a0] + data[a1:end]
    return data[start:a0] + data[a1:b0] + data[b1:end]


def scan(
    data: bytes, pos: i64, info: RequestInfo, max_head: i64, max_headers: i64, max_body: i64
) -> tuple[i64, bytes, bytes]:
    """Read a plain request head from ``data[pos:]`` into ``info`` (RequestInfo.settle)
    and return where it ends (its body starts), its method and its target; -1
    (and nothing set in ``info``) when it is not one, for llhttp to read.

    ``max_head``, ``max_headers``: lb's head limits, counted as the parser path
    counts them; ``max_body``: the largest Content-Length any route takes."""
    n: i64 = len(data)
    i: i64 = pos
    while i < n and 65 <= data[i] <= 90:  # "A".."Z"
        i += 1
    if i >= n or data[i] != 32:
        return _NOTHING
    method = _method(data, pos, i)
    if not method:
        return _NOTHING
    i += 1
    target_start = i
    if i >= n or data[i] != 47:  # origin-form: "/" first
        return _NOTHING
    while i < n and _TARGET[data[i]]:
        i += 1
    target_end = i
    if n - i < 11:
        return _NOTHING
    k: i64 = 0
    while k < 11:
        if data[i + k] != _LINE_END[k]:
            return _NOTHING
        k += 1
    i += 11
    lines_start = i - 11  # the forwarded lines begin with " HTTP/1.1\r\n", as lb's do
    size = target_end - target_start
    headers: i64 = 0
    host_start: i64 = -1
    host_end: i64 = -1
    # The Content-Length and Connection lines, in the order they came: lb writes its own.
    cut_start: i64 = -1
    cut_end: i64 = -1
    cut2_start: i64 = -1
    cut2_end: i64 = -1
    length: i64 = -1
    connection = b""
    while True:
        if i >= n:
            return _NOTHING
        if data[i] == 13:
            if i + 1 >= n or data[i + 1] != 10:
                return _NOTHING
            break
        start = i
        while i < n and CLASS[data[i]] == 1:
            i += 1
        # a name, ": " and a value that neither begins nor ends with whitespace
        if i == start or n - i < 2 or data[i] != 58 or data[i + 1] != 32:
            return _NOTHING
        name_end = i
        i += 2
        value_start = i
        if i < n and (data[i] == 32 or data[i] == 9):
            return _NOTHING
        i = field_end(data, i, n)
        if i < 0:
            return _NOTHING
        value_end = i
        if value_end > value_start and (data[value_end - 1] == 32 or data[value_end - 1] == 9):
            return _NOTHING
        i += 2
        headers += 1
        size += name_end - start + value_end - value_start + 4
        lname = watched_name(data, start, name_end)
        if lname == b"host":
            if host_start >= 0:
                return _NOTHING
            host_start, host_end = value_start, value_end
            continue
        if lname == b"content-length":
            if length >= 0 or value_end == value_start:
                return _NOTHING
            if value_end - value_start > _MAX_LENGTH_DIGITS:
                return _NOTHING
            length = 0
            k = value_start
            while k < value_end:
                c = data[k]
                if c < 48 or c > 57:
                    return _NOTHING
                length = length * 10 + c - 48
                k += 1
        elif lname == b"connection":
            if connection or not _plain_connection(data, value_start, value_end):
                return _NOTHING  # a second, a list, a header it names: RequestInfo's way
            connection = data[value_start:value_end]
        elif lname:
            return _NOTHING  # a header lb rebuilds or frames by: RequestInfo's way
        else:
            continue
        if cut_start < 0:  # (a Content-Length or Connection line)
            cut_start, cut_end = start, i
        else:
            cut2_start, cut2_end = start, i
    if host_start < 0 or headers > max_headers or size > max_head or length > max_body:
        return _NOTHING
    host = data[host_start:host_end]
    if host != info.known_host and not valid_host(host):
        return _NOTHING
    forwarded = _without(data, lines_start, i, cut_start, cut_end, cut2_start, cut2_end)
    if info.watch is not None:
        _capture(data, target_end + 11, i, info)
    info.settle(host, forwarded + _XFF_NAME, length, connection)
    return i + 2, method, data[target_start:target_end]


def _capture(data: bytes, i: i64, end: i64, info: RequestInfo) -> None:
    """Hand ``info`` the lines of ``data[i:end]`` (checked canonical by scan), for
    the headers some route, rate limit or the access log reads."""
    while i < end:
        colon = data.find(b":", i, end)
        line_end = data.find(b"\r\n", colon, end)
        info.capture(data[i:colon], data[colon + 2 : line_end])
        i = line_end + 2
