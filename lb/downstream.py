"""What an exchange sees of the client connection it answers: where its response
goes (``write``, ``cork``), the flow of the client's bytes (``valve``), how the
connection ends (``close``, lingering), and the few calls an exchange makes back
(its end, a body refused, a tunnel opened). ClientConnection (lb/client.py) is
the one subclass; an exchange never imports it, so neither imports the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxycore.deadline import Deadline
from proxycore.flow import Valve, unconnected_write


class Downstream:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        lingering: float,
        https: bool = False,
        status_line_end: bytes = b"\r\n",
    ) -> None:
        self.loop = loop
        # of the listener it came in on (lb/state.ClientSide): X-Forwarded-Proto,
        # and the end of a response's status line with any header it adds (HSTS)
        self.https = https
        self.status_line_end = status_line_end
        self.transport: asyncio.Transport | None = None
        self.valve: Valve = None  # type: ignore[assignment]  # set in connection_made
        self._send: Callable[[bytes], None] = unconnected_write
        self.client_ip = b"-"
        self.closed = False
        # the client shut its side: the connection closes after the last response
        self.done_sending = False
        self._corked = False
        self._out: list[bytes] = []
        self._lingering = lingering
        self._linger: Deadline | None = None  # closed by lb, draining what the client sends

    # -- what an exchange calls back (ClientConnection's) ---------------------------
    def last_answer(self, ex: object) -> bool:
        """Whether the connection closes after ``ex``'s response, so its head
        says so."""
        raise NotImplementedError

    def exchange_finished(self, ex: object, keep_alive: bool, abort: bool, now: float) -> None:
        """``ex`` is over (``now``: the loop time)."""
        raise NotImplementedError

    def refuse_body(self) -> None:
        """The request body being read grew past its route's max_body_bytes."""
        raise NotImplementedError

    def start_tunnel(self) -> None:
        """The exchange being answered switched protocols (101)."""
        raise NotImplementedError

    # -- writing ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self._send(data)

    def write_parts(self, parts: list[bytes]) -> None:
        """Write what ``parts`` joined make: while corked they join what else the
        read brings (a response head and its body leave in one join and one send)."""
        if self._corked:
            self._out += parts
        else:
            self.write(b"".join(parts))

    def cork(self) -> None:
        """Hold writes until uncork: what one upstream read produces leaves in one send."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()  # the list is kept: one fewer allocation per response
            if self.transport is not None and not self.closed:
                self._send(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self, linger: bool = True) -> None:
        if self._corked:
            self.uncork()
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        if not linger or self.done_sending or not transport.can_write_eof():
            transport.close()
            return
        # A lingering close (nginx's lingering_close): lb's FIN follows the
        # answer, and what the client still sends (a body lb refused, requests
        # pipelined behind the last) is read and dropped until the client
        # closes too, for timeouts.lingering at most. Closed with bytes unread,
        # the socket would send a reset, and a reset can cost the client the
        # answer it has not read yet.
        transport.write_eof()
        self.valve.release()
        self._linger = Deadline(self.loop, self._linger_over)
        self._linger.after(self._lingering)

    def _linger_over(self) -> None:
        if self.transport is not None:
            self.transport.close()
