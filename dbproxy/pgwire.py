"""The few pieces of the PostgreSQL wire protocol a proxy must understand.

A session opens with one untyped packet (Int32 length, Int32 code, body):
StartupMessage, SSLRequest, GSSENCRequest or CancelRequest. After that the proxy
only relays, except that it watches the server's first typed messages for
BackendKeyData, so that a later CancelRequest finds the server holding the
session. Everything here is pure: bytes in, values out, no I/O.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102
# The server's own bounds (MAX_STARTUP_PACKET_LENGTH, 10,000 bytes after the
# length word, and at least a protocol code): a whole packet of 8 to 10,004 bytes.
MAX_STARTUP_PACKET: Final = 10_004
MIN_STARTUP_PACKET: Final = 8

_INT32: Final = struct.Struct("!i")
_TWO_INT32: Final = struct.Struct("!ii")


class ProtocolViolation(Exception):
    """A first packet the server would drop without a word (it only logs these):
    a length out of bounds, a CancelRequest of the wrong size."""


# Plain classes, not frozen dataclasses: compiled (proxycore/compiled.py) a
# frozen dataclass still builds through its generated Python __init__, and a
# session builds one or two of these before its first byte reaches a server.
class Startup:
    """A StartupMessage, or any packet with a code the server reads as one (a
    protocol it may refuse, an SSLRequest after SSL was settled): the server
    judges it, so it goes on as it came. ``parameters`` reads it as the server's
    ProcessStartupPacket does, on demand: names up to the first empty one, each
    with the value after it, bytes as they are (decoded latin-1, never refused)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    @property
    def protocol(self) -> int:
        return int(_INT32.unpack_from(self.raw, 4)[0])

    @property
    def parameters(self) -> dict[str, str]:
        fields = self.raw[8:].split(b"\x00")
        parameters: dict[str, str] = {}
        for i in range(0, len(fields) - 1, 2):
            if not fields[i]:
                break
            parameters[fields[i].decode("latin-1")] = fields[i + 1].decode("latin-1")
        return parameters

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user


class SSLRequest:
    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class GSSENCRequest:
    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class CancelRequest:
    __slots__ = ("key", "pid", "raw")

    def __init__(self, pid: int, key: int, raw: bytes) -> None:
        self.pid = pid
        self.key = key
        self.raw = raw


FirstPacket = Startup | SSLRequest | GSSENCRequest | CancelRequest


def packet_length(buffer: bytes) -> int | None:
    """The length of the untyped packet at the head of ``buffer`` (None: not 4 bytes yet)."""
    if len(buffer) < 4:
        return None
    (length,) = _INT32.unpack_from(buffer)
    if length < MIN_STARTUP_PACKET or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation("invalid length of startup packet")
    return length


def parse_first_packet(
    packet: bytes, ssl_done: bool = False, gss_done: bool = False
) -> FirstPacket:
    """What one whole untyped packet is (its length already checked by
    packet_length), as the server tells: an SSLRequest or GSSENCRequest of any
    length, but only before the client settled that (``ssl_done``,
    ``gss_done``: then the server reads the code as a protocol version and
    refuses it); a CancelRequest of exactly 16 bytes; anything else a startup
    packet, for the server to judge."""
    code = _INT32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST and not ssl_done:
        return SSLRequest(packet)
    if code == GSSENC_REQUEST and not gss_done:
        return GSSENCRequest(packet)
    if code == CANCEL_REQUEST:
        if len(packet) != 16:
            raise ProtocolViolation("a CancelRequest not of 16 bytes")
        pid, key = _TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(pid, key, packet)
    return Startup(packet)


def unsupported_protocol(code: int) -> str:
    """The server's words for a startup packet of a protocol it does not speak
    (SQLSTATE 0A000), which is also its answer to an SSLRequest or GSSENCRequest
    sent again once settled (its code read as a version)."""
    major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
    return f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"


def lsn_bytes(lsn: str) -> int:
    """A WAL position as Postgres writes it ("16/B374D848") as a number of bytes."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def error_response(code: str, message: str, severity: str = "FATAL") -> bytes:
    """An ErrorResponse as a server sends it: psql and asyncpg print its message."""
    fields = (
        b"".join(
            kind + text.encode() + b"\x00"
            for kind, text in ((b"S", severity), (b"V", severity), (b"C", code), (b"M", message))
        )
        + b"\x00"
    )
    return b"E" + _INT32.pack(len(fields) + 4) + fields


def ssl_request() -> bytes:
    return _TWO_INT32.pack(8, SSL_REQUEST)


def cancel_request(pid: int, key: int) -> bytes:
    return _INT32.pack(16) + _TWO_INT32.pack(CANCEL_REQUEST, pid) + _INT32.pack(key)


class BackendKeyWatcher:
    """Follows the server's typed messages until ReadyForQuery, catching BackendKeyData.

    Fed the server-to-client byte stream of a session's start; after the first
    ReadyForQuery (or once the stream is not readable: TLS) it stops looking.
    """

    __slots__ = ("_buffer", "done", "key")

    def __init__(self) -> None:
        self._buffer = b""
        self.key: tuple[int, int] | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        buffer = self._buffer + data if self._buffer else data
        offset = 0
        while len(buffer) - offset >= 5:
            kind = buffer[offset]
            (length,) = _INT32.unpack_from(buffer, offset + 1)
            if length < 4:
                self._stop()  # not a message stream we understand
                return
            end = offset + 1 + length
            if end > len(buffer):
                break
            if kind == _K and length == 12:
                self.key = _TWO_INT32.unpack_from(buffer, offset + 5)
            elif kind in (_Z, _E):
                self._stop()  # ready for queries, or the server refused the session
                return
            offset = end
        self._buffer = buffer[offset:]
        if len(self._buffer) > _WATCH_LIMIT:
            self._stop()

    def _stop(self) -> None:
        self.done = True
        self._buffer = b""


_K: Final = ord("K")
_Z: Final = ord("Z")
_E: Final = ord("E")
# The messages before ReadyForQuery are small; a session start that holds more
# than this in one message is not one we can learn from.
_WATCH_LIMIT: Final = 64 * 1024


# -- typed messages (pooled listeners read both directions) --------------------------
def message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _TWO_INT32.pack(pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


# Above this a typed message from a client is refused (Postgres's own bound for
# most messages is 1 GB; a pooler holds what it parses, so it sets its own).
MAX_MESSAGE: Final = 64 * 1024 * 1024


def split_messages(buffer: bytes) -> tuple[list[tuple[int, int]], int]:
    """The whole typed messages at the head of ``buffer`` as (start, end) offsets,
    and where the rest begins. Raises ProtocolViolation on an impossible length."""
    spans = []
    offset, size = 0, len(buffer)
    while size - offset >= 5:
        (length,) = _INT32.unpack_from(buffer, offset + 1)
        if length < 4 or length > MAX_MESSAGE:
            raise ProtocolViolation(f"a message of impossible length {length}")
        end = offset + 1 + length
        if end > size:
            break
        spans.append((offset, end))
        offset = end
    return spans, offset
