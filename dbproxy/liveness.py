"""dbproxy's question to a database server suspected of a gray failure
(proxycore/silence.py): something every live PostgreSQL answers at once
without a login, an SSLRequest ('S' or 'N'). A check that timed out is a
suspicion too. No answer: the server is marked down now, its sessions closed,
and new ones go to the next fitting server.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxycore.servers import Server

from .pgwire import ssl_request


async def postmaster_answers(server: Server, timeout: float) -> bool:
    """Whether the server answers an SSLRequest within ``timeout``: any byte back
    is a live server (a frozen one accepts the connection and says nothing)."""
    address = server.spec.address
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
