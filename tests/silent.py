"""Servers that never answer, the two ways a frozen host looks from a connect."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so a
    connect to it hangs, as to a host gone silent (or a frozen server's full queue)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())
    try:
        yield hole.getsockname()[1]
    finally:
        filler.close()
        hole.close()


@contextlib.contextmanager
def never_accepting() -> Iterator[int]:
    """A port that completes the handshake and queues what is sent, and nothing
    ever answers: a frozen (SIGSTOPped) server with room in its accept queue."""
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)
    try:
        yield frozen.getsockname()[1]
    finally:
        frozen.close()
