"""What both heads share: the header names lb's rules look at, found without a
hash per name; a header line as parts of a later join; the refusal of a
request; the reason phrases of lb's own answers. The request side is
lb/request_head.py, the response side lb/response_head.py."""

from __future__ import annotations

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
PLAIN_CONNECTION_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})


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


def add_line(out: list[bytes], name: bytes, value: bytes) -> None:
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


def connection_tokens(values: Sequence[bytes]) -> set[bytes]:
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def parts_without(parts: list[bytes], drop: set[bytes], start: int = 0) -> list[bytes]:
    """Header lines (four parts each, as add_line puts them, from ``start`` on;
    the parts before it are kept) but those named in ``drop``."""
    out = parts[:start]
    for i in range(start, len(parts), 4):
        if parts[i].lower() not in drop:
            out.extend(parts[i : i + 4])
    return out


REASONS: Final = {
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    410: b"Gone",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
