"""A listener: its role (rw, ro, any), its pool mode, its socket and counters,
and the queue of relayed sessions waiting for a server's session slot."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
from typing import Any

from proxycore.config import Address


def listening(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclasses.dataclass(eq=False)
class Listener:
    name: str  # its role: rw, ro or any
    pool_mode: str = "none"  # none: a relay per client; session or transaction: pooled
    server: asyncio.Server | None = None
    active: int = 0
    total: int = 0
    queued: int = 0  # of the queue below, those still waiting
    # relayed sessions waiting for a slot (every fitting server at max_sessions), in order
    queue: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)

    @property
    def pooled(self) -> bool:
        return self.pool_mode != "none"
