"""What the proxies take from the event loop instead of doing themselves.

Both relays need TCP_NODELAY on both sides (small Postgres messages and HTTP
heads must not wait for Nagle). uvloop, which proxycore.lifecycle always runs,
sets it on every TCP transport it makes, accepted or connected; setting it again
per connection cost dbproxy two socket objects and five system calls.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop


def test_uvloop_sets_tcp_nodelay_on_accepted_and_connected_transports() -> None:
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Probe, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(Probe, "127.0.0.1", port)
        await asyncio.sleep(0.05)
        transport.close()
        server.close()
        await server.wait_closed()

    uvloop.run(main())
    assert len(seen) == 2 and all(seen), seen
