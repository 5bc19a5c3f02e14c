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
MAX_STARTUP_PACKET: Final = 10_000  # as the server's own limit (MAX_STARTUP_PACKET_LENGTH)

_INT32: Final = struct.Struct("!i")
_TWO_INT32: Final = struct.Struct("!ii")


class ProtocolViolation(Exception):
    """The client's first packet is not one a PostgreSQL server would accept."""


# Plain classes, not frozen dataclasses: compiled (proxycore/compiled.py) a
# frozen dataclass still builds through its generated Python __init__, and a
# session builds one or two of these before its first byte reaches a server.
class Startup:
    __slots__ = ("parameters", "raw")

    def __init__(self, parameters: dict[str, str], raw: bytes) -> None:
        self.parameters = parameters
        self.raw = raw

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database", self.user)


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
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    return length


def parse_first_packet(packet: bytes) -> FirstPacket:
    """Parse one whole untyped packet (its length already checked by packet_length)."""
    length, code = _TWO_INT32.unpack_from(packet)
    if length != len(packet):
        raise ProtocolViolation("startup packet length does not match")
    if code == SSL_REQUEST and length == 8:
        return SSLRequest(packet)
    if code == GSSENC_REQUEST and length == 8:
        return GSSENCRequest(packet)
    if code == CANCEL_REQUEST:
        if length != 16:
            raise ProtocolViolation("CancelRequest must be 16 bytes")
        pid, key = _TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(pid, key, packet)
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    body = packet[8:]
    # name\0value\0 pairs, then one more \0
    if not body.endswith(b"\x00") or (len(body) > 1 and not body.endswith(b"\x00\x00")):
        raise ProtocolViolation("startup packet is not terminated")
    fields = body[:-2].split(b"\x00") if len(body) > 1 else []
    if len(fields) % 2:
        raise ProtocolViolation("startup packet has a name without a value")
    parameters: dict[str, str] = {}
    try:
        for i in range(0, len(fields), 2):  # compiled, a C loop: no slices, no zip
            parameters[fields[i].decode()] = fields[i + 1].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("startup packet is not UTF-8") from None
    if not parameters.get("user"):
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return Startup(parameters, packet)


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
