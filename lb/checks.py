"""lb's active check: an HTTP/1.0 GET of the check path on a fresh connection."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from proxycore.health import CheckFailed
from proxycore.servers import Server

from .config import ActiveCheck

TlsFor = Callable[[Server], tuple[ssl.SSLContext | None, str | None]]


def _plain(server: Server) -> tuple[ssl.SSLContext | None, str | None]:
    return None, None


def http_probe(check: ActiveCheck, tls_for: TlsFor = _plain):  # type: ignore[no-untyped-def]
    """``tls_for``: the pool's way to its servers when it speaks TLS (the check
    goes the way requests go)."""
    request = (
        f"GET {check.path} HTTP/1.0\r\nHost: {check.host}\r\nUser-Agent: balance-lb-check\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    async def probe(server: Server, timeout: float) -> str:
        address = server.spec.address
        context, name = tls_for(server)
        reader, writer = await asyncio.open_connection(
            address.host, address.port, ssl=context, server_hostname=name
        )
        try:
            writer.write(request)
            line = await reader.readline()
        finally:
            writer.close()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise CheckFailed(f"not an HTTP answer: {line[:60]!r}")
        status = int(parts[1])
        if not check.expect_low <= status <= check.expect_high:
            raise CheckFailed(f"{check.path} answered {status}")
        return f"{check.path} answered {status}"

    return probe


async def http_answers(
    check: ActiveCheck, server: Server, timeout: float, tls_for: TlsFor = _plain
) -> bool:
    """Whether ``server`` answers ``check``'s request within ``timeout`` at all (a
    failing answer is an answer: a live process; a frozen one says nothing)."""
    try:
        async with asyncio.timeout(timeout):
            await http_probe(check, tls_for)(server, timeout)
    except CheckFailed:
        return True
    except (OSError, TimeoutError, ValueError):
        return False
    return True
