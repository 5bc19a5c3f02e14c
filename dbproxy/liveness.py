"""Gray failures of a database server: it accepts connections (the kernel does
that for a stopped process) but answers nothing, as under SIGSTOP, `docker
pause`, a hung disk or a stop-the-world stall.

The checks find one within fall × interval. Sessions that wait on it find it
sooner: bytes went to the server since it last sent any, and it has sent
nothing to any session for ``after`` seconds. That alone may be a long query,
so it is only a suspicion, confirmed or cleared by asking the server something
every live PostgreSQL answers at once without a login (an SSLRequest: 'S' or
'N'). A check that timed out is a suspicion too. No answer within ``after``
either: the server is marked down now, its sessions closed, and new ones go to
the next fitting server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from proxycore.config import Address
from proxycore.servers import Server

from .pgwire import ssl_request


class Silence:
    """When each server last sent anything, and whether bytes went to it since.

    Reads the relay's plain byte counters (Server.bytes_in / bytes_out) at each
    sweep: nothing is added to the relay's per-read work."""

    __slots__ = ("_heard", "after")

    def __init__(self, after: float) -> None:
        self.after = after
        # server -> (bytes_in and bytes_out when it was last heard, and when)
        self._heard: dict[Server, tuple[int, int, float]] = {}

    def suspects(self, servers: Iterable[Server], now: float) -> list[Server]:
        """Servers taking traffic, owed an answer and silent for ``after``."""
        found = []
        for server in servers:
            heard = self._heard.get(server)
            if heard is None or server.bytes_in != heard[0]:
                self._heard[server] = (server.bytes_in, server.bytes_out, now)
            elif server.bytes_out != heard[1] and now - heard[2] >= self.after and server.open:
                found.append(server)
        return found

    def cleared(self, server: Server, now: float) -> None:
        """The server answered the question: a new window of silence begins."""
        self._heard[server] = (server.bytes_in, server.bytes_out, now)


async def postmaster_answers(address: Address, timeout: float) -> bool:
    """Whether the server answers an SSLRequest within ``timeout``: any byte back
    is a live server (a frozen one accepts the connection and says nothing)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(ssl_request())
            return bool(await reader.read(1))
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
