"""The plain response, read in one pass without the parser.

Nearly every response an upstream sends is plain: `HTTP/1.1`, a final status
with a body, a Content-Length, no hop-by-hop headers but Connection, and the
whole of it in one read. llhttp reads such a response through six callbacks into
Python (status, each header, head complete, body, message complete), each a
new bytes object, an argument parse and a call; that glue was a fifth of lb's
own work per request. ``scan`` reads the same bytes in one compiled loop and
hands the lines on as slices of the read (one, or one more per line left out).

It accepts only what llhttp accepts and reads it the same way (the tests
compare the two on every input they have, and on mutations of them); anything
else, or anything it is unsure of, is None and goes to llhttp as before: an
interim or bodyless status, HTTP/1.0, chunked or close-delimited bodies, a
body not all in this read or bytes after it, obs-fold, any other hop-by-hop
header, a Connection header with more than one token.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from .heads import HOP_BY_HOP, watched_name
from .response_head import ResponseInfo

_PREFIX: Final = b"HTTP/1.1 "
# Byte classes (RFC 9110 5.6.2, 5.5): 1 = tchar (may be in a name; and in a
# value), 2 = other field-value bytes (SP, HTAB, other VCHAR, obs-text); 0 = a
# byte no head line may hold (controls, DEL): CR ends a line, others refuse.
_TCHARS: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CLASS: Final = bytes(
    1 if c in _TCHARS else 2 if c in (9, 32) or 0x21 <= c <= 0x7E or c >= 0x80 else 0
    for c in range(256)
)
_MAX_LENGTH_DIGITS: Final = 18


def field_end(data: bytes, i: i64, n: i64) -> i64:
    """The index of the CR ending the field text from ``i`` on, when a LF follows
    it; -1 when a byte on the way may not be in a head line, or the line does
    not end in this read."""
    while i < n:
        c = data[i]
        if c == 13:
            if i + 1 < n and data[i + 1] == 10:
                return i
            return -1
        if not CLASS[c]:
            return -1
        i += 1
    return -1


def _digit(c: i64) -> i64:
    # statements, not a conditional expression: compiled, that boxed the result
    if 48 <= c <= 57:
        return c - 48
    return -1


def scan(data: bytes, head: ResponseInfo) -> i64:
    """Read ``data`` as one whole plain response into ``head`` (ResponseInfo.settle)
    and return where its body starts; -1 when it is not one, for llhttp to read.

    Indices are i64 (mypy_extensions): compiled, plain C integers, where an int
    is a tagged object with an overflow check on every step of a byte loop."""
    n: i64 = len(data)
    if n < 17 or not data.startswith(_PREFIX) or data[12] != 32:
        return -1
    d0, d1, d2 = _digit(data[9]), _digit(data[10]), _digit(data[11])
    if d0 < 0 or d1 < 0 or d2 < 0:
        return -1
    status = d0 * 100 + d1 * 10 + d2
    if status < 200 or status > 599 or status == 204 or status == 304:
        return -1
    i = field_end(data, 13, n)
    if i < 0:
        return -1
    reason = data[13:i]
    i += 2
    lines_start = i
    # header lines to leave out (Content-Length's, Connection's): at most two
    cut1: i64 = -1
    cut2: i64 = -1
    cut3: i64 = -1
    cut4: i64 = -1
    length: i64 = -1
    digits = b""
    request_id = False
    keep_alive = True
    while True:
        if i >= n:
            return -1
        if data[i] == 13:
            if i + 1 >= n or data[i + 1] != 10:
                return -1
            break
        start = i
        while i < n and CLASS[data[i]] == 1:
            i += 1
        if i == start or i >= n or data[i] != 58:  # a name, then ':' (no space before it)
            return -1
        name_end = i
        i += 1
        while i < n and (data[i] == 32 or data[i] == 9):
            i += 1
        value_start = i
        i = field_end(data, i, n)
        if i < 0:
            return -1
        value_end = i
        while value_end > value_start and (data[value_end - 1] == 32 or data[value_end - 1] == 9):
            value_end -= 1
        i += 2
        lname = watched_name(data, start, name_end)
        if lname == b"content-length":
            if length >= 0 or value_end == value_start:
                return -1
            if value_end - value_start > _MAX_LENGTH_DIGITS:
                return -1
            length = 0
            k = value_start
            while k < value_end:
                d = _digit(data[k])
                if d < 0:
                    return -1
                length = length * 10 + d
                k += 1
            digits = data[value_start:value_end]
        elif lname == b"connection":
            token = data[value_start:value_end].lower()
            if token == b"close":
                keep_alive = False
            elif token != b"keep-alive":
                return -1
        elif lname in HOP_BY_HOP:
            return -1  # another hop-by-hop header: ResponseInfo's way
        else:
            # a line the client gets as it came
            request_id = request_id or lname == b"x-request-id"
            continue
        if cut1 < 0:
            cut1, cut2 = start, i
        elif cut3 < 0:
            cut3, cut4 = start, i
        else:
            return -1
    body_start = i + 2
    if length < 0 or n - body_start != length:
        return -1  # no length, or not all of it (or more) in this read
    if cut1 < 0:
        lines = data[lines_start:i]
    elif cut3 < 0:
        lines = data[lines_start:cut1] + data[cut2:i]
    else:
        lines = data[lines_start:cut1] + data[cut2:cut3] + data[cut4:i]
    head.settle(int(status), reason, lines, digits, request_id, keep_alive)
    return body_start
