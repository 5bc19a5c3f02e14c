"""The control channel between a supervisor and one of its workers: JSON messages,
each framed by its length, over a Unix socket pair made at spawn.

Either side sends a message (a dict with an "op"), or a request that the other
answers: a request carries an "id", its answer is {"op": "reply", "id", ...}.
Nothing here is on a proxy's hot path: the channel carries server state, counters
at scrape time, ejections and cancels, never a request or a session.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

log = logging.getLogger("balance.channel")

Message = dict[str, Any]
# What a side does with a message: nothing to answer (None), or the answer to a request.
Handler = Callable[[Message], Awaitable[Message | None] | Message | None]

_LENGTH: Final = struct.Struct("!I")
MAX_MESSAGE: Final = 64 * 1024 * 1024


class Channel(asyncio.Protocol):
    def __init__(self, handler: Handler, on_close: Callable[[], None] | None = None) -> None:
        self._handler = handler
        self._on_close = on_close
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self.closed = False

    @classmethod
    async def over(
        cls,
        sock: socket.socket,
        handler: Handler,
        on_close: Callable[[], None] | None = None,
    ) -> Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(lambda: cls(handler, on_close), sock=sock)
        return channel

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                log.error("control channel: a message of %d bytes; closing", size)
                self.close()
                return
            if len(self._buffer) < 4 + size:
                return
            body, self._buffer = self._buffer[4 : 4 + size], self._buffer[4 + size :]
            self._dispatch(json.loads(body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("control channel closed"))
        self._waiting.clear()
        if self._on_close is not None:
            self._on_close()

    # -- sending ------------------------------------------------------------------
    def send(self, message: Message) -> None:
        if self._transport is None or self.closed or self._transport.is_closing():
            return
        body = json.dumps(message, separators=(",", ":")).encode()
        self._transport.write(_LENGTH.pack(len(body)) + body)

    async def request(self, message: Message, timeout: float = 5.0) -> Message:
        """Send ``message`` and wait for its answer (ConnectionError, TimeoutError)."""
        if self.closed:
            raise ConnectionError("control channel closed")
        ident = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.send({**message, "id": ident})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(ident, None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- receiving ----------------------------------------------------------------
    def _dispatch(self, message: Message) -> None:
        if message.get("op") == "reply":
            future = self._waiting.get(message.get("id", -1))
            if future is not None and not future.done():
                future.set_result(message)
            return
        asyncio.get_running_loop().create_task(self._handle(message))

    async def _handle(self, message: Message) -> None:
        try:
            answer = self._handler(message)
            if isinstance(answer, Awaitable):
                answer = await answer
        except Exception:  # a bad message costs this message, never the channel
            log.exception("control channel: handling %s failed", message.get("op"))
            answer = {"error": "failed"}
        if "id" in message:
            self.send({**(answer or {}), "op": "reply", "id": message["id"]})
