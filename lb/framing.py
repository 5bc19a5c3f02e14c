"""Where each part of a request ends: its head, and a chunked body.

llhttp reads a request but tells nothing of where it is in the bytes: not where
a head ends, not a chunk's declared size (so a chunk of 2^63 bytes parks the
connection until the body timeout while llhttp waits for it), not where a body
ends and the next request begins. The client connection (client.py) needs all
three: it feeds llhttp one part at a time, a head up to its blank line, then
its body up to its end, so that it knows where every request starts.

``head_end`` finds the blank line that ends a head: llhttp ends a head at its
first empty line (it refuses a bare LF and a folded line), so that is where
llhttp ends it too. ``ChunkedBody`` follows a chunked body by RFC 9112 7.1,
strictly (CRLF line ends, a size of hex digits, a bounded line and trailer
section), and answers for every read how far the body goes in it; a chunk
declared past what the body may still hold is refused before a byte of it
arrives. llhttp stays the judge of what it reads (a chunk extension, say): an
input one accepts and the other does not is refused either way, and where the
two would end a body apart the request is refused (client.py checks that
llhttp ended the message where this did). ``escape_request_line`` and
``as_http11`` make a request line llhttp would refuse for its bytes alone one
it reads as nginx does.
"""

from __future__ import annotations

import re
from typing import Final

from mypy_extensions import i64

from .heads import BadRequest

_SIZE: Final = 0  # reading a chunk-size line
_DATA: Final = 1  # inside a chunk's data
_DATA_END: Final = 2  # the CRLF after a chunk's data
_TRAILER: Final = 3  # trailer lines, up to the empty line that ends the body
_DONE: Final = 4

# The largest size a chunk may declare at all (nginx's off_t); past it the
# number is refused as malformed (400), under it as too large (413).
_MAX_SIZE: Final = (1 << 63) - 1
# A chunk-size line with its extensions: no client needs more.
MAX_SIZE_LINE: Final = 4096
_HEX: Final = b"0123456789abcdefABCDEF"


def head_end(data: bytes, i: i64) -> i64:
    """The index just past the first CRLF CRLF in ``data`` from ``i``, or -1.

    A compiled loop that looks at every fourth byte of header text (a byte
    that is neither CR nor LF cannot be in the four, so the next place they
    may end is four on): for a head of a few lines, a tenth of the cost of a
    call to bytes.find, whose argument parsing alone was more than the search.
    """
    n: i64 = len(data)
    i += 3  # the index of the last byte of a candidate
    while i < n:
        c = data[i]
        if c == 10:
            if data[i - 1] == 13 and data[i - 2] == 10 and data[i - 3] == 13:
                return i + 1
            i += 2  # not the last of the four: at best the second, two before the end
        elif c == 13:
            i += 1  # the first or the third of the four: the end is one or three on
        else:
            i += 4
    return -1


class ChunkedBody:
    """The framing of one chunked body: ``scan`` it read by read until ``done``.

    ``budget``: how many body bytes the request may still carry
    (limits.max_body_bytes); ``max_trailer``: the bytes the trailer section
    may take (limits.max_header_bytes)."""

    __slots__ = (
        "_budget",
        "_left",
        "_limit",
        "_line",
        "_max_trailer",
        "_state",
        "_trailer",
        "done",
    )

    def __init__(self, budget: int, max_trailer: int) -> None:
        self._limit = budget
        self._state: i64 = _SIZE
        self._left: i64 = 0  # data bytes of the current chunk still to come
        self._budget: i64 = budget
        self._line = b""  # a line not yet ended by LF in the reads so far
        self._trailer: i64 = 0
        self._max_trailer: i64 = max_trailer
        self.done = False

    def scan(self, data: bytes, pos: i64) -> i64:
        """How far the body goes in ``data`` from ``pos``: the index just past
        its last byte when it ends in this read (``done``), else len(data).
        Raises BadRequest on framing a strict reader refuses."""
        n: i64 = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
                continue
            if state == _DONE:
                break
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                self._line_bound(len(self._line))
                return n
            line = data[pos : nl + 1]
            if self._line:
                line = self._line + line
                self._line = b""
            pos = nl + 1
            self._line_bound(len(line))
            if len(line) < 2 or line[len(line) - 2] != 13:
                raise BadRequest(400, "bad_request", "a chunked body line without CRLF")
            if state == _SIZE:
                self._size_line(line)
            elif state == _DATA_END:
                if len(line) != 2:
                    raise BadRequest(400, "bad_request", "chunk data longer than its size")
                self._state = _SIZE
            elif len(line) == 2:  # the empty line after the trailers: the end
                self._state = _DONE
                self.done = True
                return pos
            else:
                self._trailer += len(line)
                if self._trailer > self._max_trailer:
                    raise BadRequest(
                        431, "header_too_large", f"trailer over {self._max_trailer} bytes"
                    )
        return pos

    def _line_bound(self, size: i64) -> None:
        limit = self._max_trailer if self._state == _TRAILER else MAX_SIZE_LINE
        if size > limit:
            raise BadRequest(400, "bad_request", "a chunked body line too long")

    def _size_line(self, line: bytes) -> None:
        end: i64 = len(line) - 2
        i: i64 = 0
        while i < end and line[i] in _HEX:
            i += 1
        if i == 0:
            raise BadRequest(400, "bad_request", "a chunk size that is not a hex number")
        if i < end and line[i] not in b"; \t":
            raise BadRequest(400, "bad_request", "a chunk size followed by a stray byte")
        # A run of digits too long for any size is refused unread (int() of a
        # huge string is not free); leading zeros are kept within the line limit.
        digits = line[:i].lstrip(b"0")
        if len(digits) > 16 or (digits and int(digits, 16) > _MAX_SIZE):
            raise BadRequest(400, "bad_request", "a chunk size out of range")
        size: i64 = int(digits, 16) if digits else 0
        if size > self._budget:
            raise BadRequest(413, "payload_too_large", f"request body over {self._limit} bytes")
        self._budget -= size
        if size == 0:
            self._state = _TRAILER
        else:
            self._left = size
            self._state = _DATA


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
