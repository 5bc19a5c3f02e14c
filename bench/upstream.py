"""A fixed-response HTTP/1.1 upstream for throughput runs: it must cost far less
than any proxy in front of it, so it is a bare protocol, not a framework.

python -m bench.upstream --port P [--name N] [--delay S] [--fail STATUS] [--size B]
Answers every request with 200 and a short body (or one of B bytes), keep-alive;
GET /health too.
Shaped (for `python -m bench gray`): ``--delay`` answers each request but
/health after S seconds (a server slow in its work, quick in its health
check, the gray failure checks miss); ``--fail`` answers each one but /health
with STATUS at once (a server failing fast); GET /__requests answers how many
requests it received, /health and itself not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop


def response(name: str, size: int = 0) -> bytes:
    """``size``: a body of that many bytes instead of the greeting."""
    body = f"hello from {name}\n".encode()
    if size:
        body = (body * (size // len(body) + 1))[:size]
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


class Shape:
    """What a shaped upstream does with a request, and how many it has had."""

    def __init__(self, name: str, delay: float, fail: int) -> None:
        self.ok = response(name)
        self.delay = delay
        self.failure = b""
        if fail:
            self.failure = b"HTTP/1.1 %d Failing\r\nContent-Length: 5\r\n\r\nfail\n" % fail
        self.requests = 0


class Shaped(asyncio.Protocol):
    """Reads each request's line (the bench sends no bodies) and answers it as
    ``shape`` says; answers stay in order, a delayed one holding those behind."""

    def __init__(self, shape: Shape) -> None:
        self._shape = shape
        self._tail = b""
        self._transport: asyncio.Transport | None = None
        self._due = 0.0  # when the last answer written or scheduled goes out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        heads = (self._tail + data).split(b"\r\n\r\n")
        self._tail = heads.pop()[-4096:]
        for head in heads:
            self._answer(head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/")

    def _answer(self, path: bytes) -> None:
        shape = self._shape
        loop = asyncio.get_running_loop()
        if path == b"/health":
            self._send(shape.ok, 0.0, loop)
        elif path == b"/__requests":
            body = b"%d\n" % shape.requests
            self._send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body), 0.0, loop
            )
        else:
            shape.requests += 1
            self._send(shape.failure or shape.ok, shape.delay, loop)

    def _send(self, answer: bytes, delay: float, loop: asyncio.AbstractEventLoop) -> None:
        at = max(loop.time() + delay, self._due)
        self._due = at
        if at <= loop.time():
            self._write(answer)
        else:
            loop.call_at(at, self._write, answer)

    def _write(self, answer: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(
    port: int, name: str, delay: float = 0.0, fail: int = 0, shaped: bool = False, size: int = 0
) -> None:
    loop = asyncio.get_running_loop()
    answer = response(name, size)
    if shaped or delay or fail:
        shape = Shape(name, delay, fail)
        server = await loop.create_server(lambda: Shaped(shape), "127.0.0.1", port, backlog=4096)
    else:
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
    p.add_argument("--delay", type=float, default=0.0, help="answer each request after S seconds")
    p.add_argument("--fail", type=int, default=0, help="answer each request with this status")
    p.add_argument("--count", action="store_true", help="count requests (GET /__requests)")
    p.add_argument("--size", type=int, default=0, help="a body of this many bytes")
    args = p.parse_args()
    uvloop.run(serve(args.port, args.name, args.delay, args.fail, args.count, args.size))


if __name__ == "__main__":
    main()
