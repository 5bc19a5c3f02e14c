"""A fixed-response HTTP/1.1 upstream for throughput runs: it must cost far less
than any proxy in front of it, so it is a bare protocol, not a framework.

python -m bench.upstream --port P [--name N]
Answers every request with 200 and a short body, keep-alive; GET /health too.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop


def response(name: str) -> bytes:
    body = f"hello from {name}\n".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


class FixedResponse(asyncio.Protocol):
    """Counts request heads by their blank line; the bench sends no bodies."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._tail = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self._tail + data
        count = data.count(b"\r\n\r\n")
        self._tail = data[data.rfind(b"\r\n\r\n") + 4 :] if count else data[-4096:]
        if count and self._transport is not None:
            self._transport.write(self._answer * count)


async def serve(port: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    answer = response(name)
    server = await loop.create_server(
        lambda: FixedResponse(answer), "127.0.0.1", port, backlog=4096
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="upstream")
    args = p.parse_args()
    uvloop.run(serve(args.port, args.name))


if __name__ == "__main__":
    main()
