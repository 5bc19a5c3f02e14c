"""Named prepared statements under transaction pooling (pgbouncer 1.21's
max_prepared_statements), and what a server connection still owes.

A client's named statement lives on whichever server connection it was parsed
on, and its next transaction may land on another. So a client's Parse of
"s1" becomes a Parse of a name made from the statement itself (its text and
parameter types: two clients preparing the same query share it), and where
the client later binds, describes or closes "s1" on a connection that has not
seen that statement, its Parse is sent there first and its ParseComplete kept
from the client. A client re-parsing a statement the connection holds already
gets it closed and parsed again (one answer each, in order, with no answer to
make up). The connection keeps at most ``limit`` statements, the least
recently used closed first.

``Outstanding`` counts what a server connection was sent and has not answered
(a Sync, a Query or a FunctionCall each end with one ReadyForQuery), so that a
connection goes back to its pool only with nothing in flight, and which of the
answers to come are dbproxy's own, to drop. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Final

from .pgwire import message

_INT32: Final = struct.Struct("!i")
PREFIX: Final = "dbproxy_"
# message kinds a client sends that end a batch: the server answers each with a ReadyForQuery
BATCH_ENDS: Final = frozenset(b"SQF")


def server_name(body_after_name: bytes) -> str:
    return PREFIX + hashlib.blake2b(body_after_name, digest_size=10).hexdigest()


class Outstanding:
    """One server connection's unanswered batches and the answers to drop."""

    __slots__ = ("done", "expect", "prepared", "sent")

    def __init__(self) -> None:
        self.sent = 0  # batches sent (Sync, Query, FunctionCall)
        self.done = 0  # ReadyForQuery received
        # answers to come for Parse ('1') and Close ('3'), in order:
        # (kind, keep for the client, batch, statement name)
        self.expect: collections.deque[tuple[int, bool, int, str]] = collections.deque()
        # statements this connection holds, least recently used first
        self.prepared: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def idle(self) -> bool:
        return self.sent == self.done and not self.expect

    def answer(self, kind: int, body: bytes) -> bool:
        """A message from the server: whether the client gets it."""
        if kind in (_PARSE_COMPLETE, _CLOSE_COMPLETE):
            expect = self.expect
            if expect and expect[0][0] == kind:
                return expect.popleft()[1]
            return True
        if kind == _ERROR:
            # The server skips to the next Sync: what this batch still owed will not come.
            batch = self.done
            while self.expect and self.expect[0][2] == batch:
                what, _, _, name = self.expect.popleft()
                if what == _PARSE_COMPLETE:
                    self.prepared.pop(name, None)  # its Parse may be what failed
                elif name:
                    self.prepared[name] = None  # not closed after all
        elif kind == _READY:
            self.done += 1
        return True


_PARSE_COMPLETE: Final = ord("1")
_CLOSE_COMPLETE: Final = ord("3")
_ERROR: Final = ord("E")
_READY: Final = ord("Z")


class Statements:
    """One client's named statements: its name → (the server's name, the Parse
    body after the name)."""

    __slots__ = ("_by_name", "limit")

    def __init__(self, limit: int) -> None:
        self._by_name: dict[bytes, tuple[str, bytes]] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._by_name)

    def rewrite(self, kind: int, body: bytes, out: Outstanding) -> bytes:
        """The client's message as the server connection gets it (one message or
        more, or as it came)."""
        if kind == _P:
            name, sep, rest = body.partition(b"\0")
            if not name or not sep:
                return message(b"P", body)
            target = server_name(rest)
            self._by_name[name] = (target, rest)
            return self._parse(out, target, rest, keep=True)
        if kind == _B:
            portal, sep, rest = body.partition(b"\0")
            statement, sep2, tail = rest.partition(b"\0")
            known = self._by_name.get(statement) if statement and sep and sep2 else None
            if known is None:
                return message(b"B", body)
            target, parse = known
            ensure = self._ensure(out, target, parse)
            return ensure + message(b"B", portal + b"\0" + target.encode() + b"\0" + tail)
        if kind in (_D, _C):
            what, name = body[:1], body[1:].rstrip(b"\0")
            known = self._by_name.get(name) if what == b"S" and name else None
            tag = b"D" if kind == _D else b"C"
            if known is None:
                return message(tag, body)
            target, parse = known
            if kind == _C:
                del self._by_name[name]
                # closed on the server too: a statement another client shares is
                # prepared again where that client next needs it
                had = out.prepared.pop(target, _ABSENT) is not _ABSENT
                out.expect.append((_CLOSE_COMPLETE, True, out.sent, target if had else ""))
                return message(b"C", b"S" + target.encode() + b"\0")
            return self._ensure(out, target, parse) + message(b"D", b"S" + target.encode() + b"\0")
        return message(bytes((kind,)), body)

    def _ensure(self, out: Outstanding, target: str, parse: bytes) -> bytes:
        """``target`` prepared on the connection first, its answer dropped."""
        if target in out.prepared:
            out.prepared.move_to_end(target)
            return b""
        return self._parse(out, target, parse, keep=False)

    def _parse(self, out: Outstanding, target: str, parse: bytes, keep: bool) -> bytes:
        sent = []
        if target in out.prepared:
            # parsed again, as the client asked: close it first (Parse of a name
            # in use fails), and drop that answer
            sent.append(message(b"C", b"S" + target.encode() + b"\0"))
            out.expect.append((_CLOSE_COMPLETE, False, out.sent, target))
            del out.prepared[target]
        elif self.limit and len(out.prepared) >= self.limit:
            evicted, _ = out.prepared.popitem(last=False)
            sent.append(message(b"C", b"S" + evicted.encode() + b"\0"))
            out.expect.append((_CLOSE_COMPLETE, False, out.sent, evicted))
        sent.append(message(b"P", target.encode() + b"\0" + parse))
        out.expect.append((_PARSE_COMPLETE, keep, out.sent, target))
        out.prepared[target] = None
        return b"".join(sent)


_ABSENT: Final = object()
_P: Final = ord("P")
_B: Final = ord("B")
_D: Final = ord("D")
_C: Final = ord("C")
