"""Transaction mode's reading of a client's traffic, both ways.

From the client: whole messages, named statements renamed (prepared.py), each
Sync, Query or FunctionCall counted as a batch the server owes a ReadyForQuery.
From the server: each message's header only (a few bytes), to find the
ReadyForQuery that may end a transaction, the answers dbproxy's own Parse and
Close are owed (dropped), the errors that cancel what a batch still owed, and
the ParameterStatus of a parameter the client SET; the rest passes unread, a
message cut across reads included.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from .prepared import BATCH_ENDS, Outstanding, Statements
from .serverconn import ServerConn

_INT32: Final = struct.Struct("!i")
_REWRITTEN: Final = frozenset(b"PBDC")
TERMINATE: Final = ord("X")
_Z: Final = ord("Z")
_S: Final = ord("S")

# a ParameterStatus from the server: (its connection, the message's body)
Follow = Callable[[ServerConn, bytes], None]


class ImpossibleMessage(Exception):
    """The server sent a length no message has."""


class Transactions:
    __slots__ = ("_head", "_pass", "statements", "unsynced")

    def __init__(self, max_prepared: int) -> None:
        # None: named statements pass as they are (max_prepared_statements 0)
        self.statements = Statements(max_prepared) if max_prepared else None
        self.unsynced = False  # sent the server messages with no Sync after them yet
        self._head = b""  # the start of a server message header, held to decide on it
        self._pass = 0  # bytes of the server message under way, passed unread

    @property
    def between_messages(self) -> bool:
        """Nothing of a server message is held or still to come, nothing unsynced sent."""
        return not (self._pass or self._head or self.unsynced)

    def to_server(
        self, buffer: bytes, spans: list[tuple[int, int]], rest: int, out: Outstanding
    ) -> tuple[bytes, bool]:
        """What the server connection gets of the client's whole messages, and
        whether a Terminate ended them (what came after it is not sent)."""
        statements = self.statements
        pieces = []
        run = spans[0][0]
        for start, end in spans:
            kind = buffer[start]
            if kind == TERMINATE:
                pieces.append(buffer[run:start])
                return b"".join(pieces), True
            if statements is not None and kind in _REWRITTEN:
                pieces.append(buffer[run:start])
                pieces.append(statements.rewrite(kind, buffer[start + 5 : end], out))
                run = end
            if kind in BATCH_ENDS:
                out.sent += 1
                self.unsynced = False
            else:
                self.unsynced = True
        pieces.append(buffer[run:rest])
        return b"".join(pieces), False

    def from_server(self, conn: ServerConn, data: bytes, follow: Follow) -> tuple[bytes, bool]:
        """What the client gets of the server's bytes, and whether a ReadyForQuery
        was among them (its status in ``conn.status``)."""
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        i = min(self._pass, n)
        self._pass -= i
        out = conn.outstanding
        pieces = []
        run = 0
        ready = False
        while i < n:
            kind = data[i]
            if n - i < 5 or (kind == _Z and n - i < 6):
                # a header cut short (or a ReadyForQuery's status): held to decide on
                self._head = data[i:]
                break
            (length,) = _INT32.unpack_from(data, i + 1)
            if length < 4:
                raise ImpossibleMessage(f"a message of length {length}")
            end = i + 1 + length
            if kind == _Z:
                conn.status = data[i + 5 : i + 6]
                ready = True
            elif kind == _S and end <= n:
                follow(conn, data[i + 5 : end])
            if not out.answer(kind, b""):
                pieces.append(data[run:i])
                run = end
            if end > n:
                self._pass = end - n
                i = n
                break
            i = end
        pieces.append(data[run:i])
        return b"".join(pieces), ready
