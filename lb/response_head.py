"""The response head: gathered as the parser reads it (ResponseInfo) and
rewritten for the client (hop-by-hop headers out, framing for the client,
X-Request-ID in); and lb's own answers (error_response)."""

from __future__ import annotations

from typing import Final

from .heads import (
    HOP_BY_HOP,
    PLAIN_CONNECTION_TOKENS,
    REASONS,
    Header,
    add_line,
    connection_tokens,
    parts_without,
    rule_name,
)

REBUILT_RESPONSE: Final = HOP_BY_HOP | {b"content-length"}


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
            add_line(self._parts, name, value)
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
            named = connection_tokens([value])
            self._tokens = named if self._tokens is None else self._tokens | named
        elif lname == b"upgrade":
            # Kept in its place; only a 101 passes it on (see finish).
            self._upgrade_seen = True
            add_line(self._parts, name, value)

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
        if tokens is not None and tokens - PLAIN_CONNECTION_TOKENS:
            drop = tokens - {b"upgrade"} if upgrade else set(tokens)
        if self._upgrade_seen and not upgrade:
            drop = {b"upgrade"} if drop is None else drop | {b"upgrade"}
        if drop:
            # Rare: headers named in Connection are hop-by-hop too.
            parts = parts_without(parts, drop)
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
    status_line_end: bytes = b"\r\n",
) -> list[bytes]:
    """The head sent to the client, framed for it (HTTP/1.1 keep-alive unless told
    otherwise), as at most nine parts: the client's connection joins them with the
    body read with them (ClientConnection.write_parts), one join of at most ten
    (CPython's join allocates its bookkeeping for more) for the whole response.

    ``content_length``: the digits to send, as in ResponseInfo.content_length.
    ``status_line_end``: the status line's end, and any header the listener
    adds to every response (HSTS) after it.
    """
    parts = [_status_line_start(status), reason, status_line_end, info.lines]
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
