"""A resettable timeout that costs a float store per reset, not a timer.

Hot paths set, move and clear deadlines on every request. A loop timer created
and cancelled each time measured at a quarter of lb's CPU per request, so here
a connection holds at most one timer: moving the deadline later, or clearing
it, only stores a float; when the timer fires early it re-arms for what is left
or does nothing. Only a deadline earlier than the armed timer costs a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

# "No deadline": a plain float, not None, so that compiled (proxycore/compiled.py)
# a deadline is a C double in the object and setting one allocates nothing.
_NONE: Final = -1.0


class Deadline:
    __slots__ = ("_at", "_callback", "_handle", "_handle_at", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._at = _NONE
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0

    def after(self, seconds: float) -> None:
        """Fire ``seconds`` from now unless moved or cancelled before."""
        self.at(self._loop.time() + seconds)

    def at(self, at: float) -> None:
        """Fire at loop time ``at``: for a caller that has read the clock already."""
        self._at = at
        if self._handle is None or self._handle_at > at:
            if self._handle is not None:
                self._handle.cancel()
            self._handle_at = at
            self._handle = self._loop.call_at(at, self._fire)

    def cancel(self) -> None:
        """No deadline for now; the armed timer, if any, will fire and find nothing due."""
        self._at = _NONE

    def stop(self) -> None:
        """For good (the connection is closing): release the timer too."""
        self._at = _NONE
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def armed(self) -> bool:
        return self._at != _NONE

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at == _NONE:
            return
        if self._loop.time() >= at:
            self._at = _NONE
            self._callback()
        else:
            self._handle_at = at
            self._handle = self._loop.call_at(at, self._fire)
