"""Where a CancelRequest goes.

A relayed session's client knows its server's own BackendKeyData (dbproxy read
it going by); a pooled session's client knows dbproxy's, made here, and its
cancel goes with the server's key to the connection the session holds at that
moment (none: nothing runs, nothing to cancel). A key this process does not
know is asked of the other workers through the supervisor; a relayed key no
one knows (a TLS session's, whose start dbproxy could not read) goes to every
server its listener may route to, which ignore a key not theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from proxycore.channel import Channel, Message
from proxycore.servers import Server
from proxycore.workers import Workers

from .pgwire import CancelRequest, cancel_request

log = logging.getLogger("dbproxy")


class Cancellable(Protocol):
    def cancel_target(self) -> tuple[Server, tuple[int, int]] | None:
        """The server and its BackendKeyData a cancel for this session goes to now."""
        ...


# the servers a broadcast cancel of a listener goes to
Targets = Callable[[str], Iterable[Server]]


_KEY: Final = struct.Struct("!ii")
# random bytes drawn this many keys at a time: one getrandom() per 512 logins
_KEYS_PER_DRAW: Final = 512


class Cancels:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, connect_timeout: Callable[[], float]
    ) -> None:
        self.loop = loop
        self._connect_timeout = connect_timeout
        self.keys: dict[tuple[int, int], Cancellable] = {}
        self.own: set[tuple[int, int]] = set()  # the keys dbproxy made (pooled sessions)
        self.routed = 0
        self.broadcast = 0
        self.idle = 0  # cancels for a pooled session that held no server connection
        # in a worker, its channel to the supervisor: a key unknown here is asked there
        self._supervisor: Channel | None = None
        self.targets: Targets = lambda name: ()
        self._random = b""
        self._drawn = 0

    def remember(self, key: tuple[int, int], session: Cancellable) -> None:
        self.keys[key] = session

    def _own_key(self) -> tuple[int, int]:
        """A BackendKeyData of dbproxy's: a process id above 2^30 (no Postgres
        backend's on a usual pid range) and a secret from the system's random."""
        if self._drawn >= len(self._random):
            self._random = os.urandom(_KEY.size * _KEYS_PER_DRAW)
            self._drawn = 0
        pid, key = _KEY.unpack_from(self._random, self._drawn)
        self._drawn += _KEY.size
        return (pid & 0x3FFFFFFF) | 0x40000000, key

    def new_key(self, session: Cancellable) -> tuple[int, int]:
        key = self._own_key()
        while key in self.keys:
            key = self._own_key()
        self.keys[key] = session
        self.own.add(key)
        return key

    def forget(self, key: tuple[int, int], session: Cancellable) -> None:
        if self.keys.get(key) is session:
            del self.keys[key]
            self.own.discard(key)

    def deliver(self, request: CancelRequest, listener: str, pooled: bool) -> None:
        key = (request.pid, request.key)
        if self.mine(key):
            return
        if self._supervisor is not None:
            relayed = "" if pooled else listener
            self.loop.create_task(self._via_supervisor(request.pid, request.key, relayed))
            return
        if not pooled:
            self.to_all(request.pid, request.key, listener)

    def mine(self, key: tuple[int, int]) -> bool:
        """Deliver the cancel for ``key`` if a session here has it."""
        session = self.keys.get(key)
        if session is None:
            return False
        target = session.cancel_target()
        if target is None:
            self.idle += 1
            return True
        server, server_key = target
        self.routed += 1
        self.loop.create_task(self._send(server, cancel_request(*server_key)))
        return True

    # -- across workers ---------------------------------------------------------------
    def ask_supervisor(self, channel: Channel) -> None:
        """In a worker: a key this process does not know is asked of the others
        through the supervisor (``channel``); a relayed one no worker holds goes
        to every server of its listener."""
        self._supervisor = channel

    async def _via_supervisor(self, pid: int, key: int, listener: str) -> None:
        assert self._supervisor is not None
        try:
            answer = await self._supervisor.request({"op": "cancel", "pid": pid, "key": key})
        except (ConnectionError, TimeoutError):
            answer = {}
        if not answer.get("delivered") and listener:
            self.to_all(pid, key, listener)

    def if_mine(self, message: Message) -> Message | None:
        """A worker asked by its supervisor whether it holds a key: delivered if so."""
        if message.get("op") != "cancel_if_yours":
            return None
        return {"delivered": self.mine((message["pid"], message["key"]))}

    def to_all(self, pid: int, key: int, listener: str) -> None:
        """A relayed key no one knows: to every server the listener may route to."""
        self.broadcast += 1
        packet = cancel_request(pid, key)
        for server in self.targets(listener):
            self.loop.create_task(self._send(server, packet))

    async def _send(self, server: Server, packet: bytes) -> None:
        address = server.spec.address
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), self._connect_timeout()
            )
        except (OSError, TimeoutError) as exc:
            log.info("cancel to %s not delivered: %s", server.name, exc)
            return
        writer.write(packet)
        try:
            await writer.drain()
        finally:
            writer.close()


async def in_workers(workers: Workers, message: Message) -> Message:
    """The supervisor's part: a worker's "cancel" of a key it did not know goes to
    every worker; the one holding that session delivers it (and counts it);
    ``delivered`` False if none did."""
    answers = await workers.gather(
        {"op": "cancel_if_yours", "pid": message["pid"], "key": message["key"]}
    )
    return {"delivered": any(a.get("delivered") for a in answers)}
