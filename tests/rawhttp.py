"""A raw HTTP/1.1 client for tests that must control every byte on the wire."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> Response:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_request or status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b"")
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    else:
        body = await reader.read()
    return Response(status, headers, body)


async def send(port: int, data: bytes, count: int = 1, timeout: float = 10.0) -> list[Response]:
    """Send raw bytes on a new connection and read ``count`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return [await read_response(reader) for _ in range(count)]
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if not await reader.read(65536):
                    return True
            except ConnectionResetError:
                return True


def get(path: str, host: str = "test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
