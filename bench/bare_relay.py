"""A reference point, not a product: the least an HTTP relay on uvloop + httptools can do.

No health checks, metrics, retries, limits, timeouts or header rewriting beyond
X-Forwarded-For; round robin over keep-alive upstream connections. `bench http`
runs it beside lb so the cost of lb's features, and the ceiling of this design
in CPython, are measured in the same run as nginx and HAProxy.

python -m bench.bare_relay --listen PORT --upstream PORT --upstream PORT
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import socket
from typing import Any

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []
        self.out: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        client = self.client
        self.parser.feed_data(data)
        if client is not None and self.out:
            if not client.transport.is_closing():  # wrk hangs up with requests in flight
                client.transport.write(b"".join(self.out))
            self.out = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.out.append(b"HTTP/1.1 200 OK\r\n" + b"".join(self.headers) + b"\r\n")
        self.headers = []

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        self.client = None
        self.pool.append(self)


class Client(asyncio.Protocol):
    def __init__(
        self, upstreams: list[tuple[int, list[Upstream]]], turn: itertools.cycle[int]
    ) -> None:
        self.upstreams = upstreams
        self.turn = turn
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[bytes] = []
        self.url = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        head = b"GET %b HTTP/1.1\r\n%bX-Forwarded-For: 127.0.0.1\r\n\r\n" % (
            self.url,
            b"".join(self.headers),
        )
        self.headers = []
        port, pool = self.upstreams[next(self.turn)]
        if pool:
            upstream = pool.pop()
            upstream.client = self
            upstream.transport.write(head)
        else:
            asyncio.get_running_loop().create_task(self._connect(port, pool, head))

    async def _connect(self, port: int, pool: list[Upstream], head: bytes) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(pool), "127.0.0.1", port
        )
        upstream.client = self
        upstream.transport.write(head)


async def serve(listen: int, upstream_ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    upstreams: list[tuple[int, list[Upstream]]] = [(p, []) for p in upstream_ports]
    turn = itertools.cycle(range(len(upstreams)))
    server = await loop.create_server(
        lambda: Client(upstreams, turn), "127.0.0.1", listen, backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bare_relay")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", type=int, action="append", required=True)
    args = p.parse_args()
    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
