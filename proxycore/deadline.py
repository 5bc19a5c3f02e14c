"""A resettable timeout that costs a float store per reset, not a timer.

Hot paths set, move and clear deadlines on every request. A loop timer created
and cancelled each time measured at a quarter of lb's CPU per request, so here
a connection holds at most one timer: moving the deadline later, or clearing
it, only stores a float; when the timer fires early it re-arms for what is left
or does nothing. Only a deadline earlier than the armed timer costs a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

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
        """For good (the connection is closing): release the timer and the callback.

        The callback is the owner's bound method, so owner and Deadline form a
        cycle; dropping it here lets reference counting free a closed connection
        at once instead of leaving it to the cyclic collector.
        """
        self._at = _NONE
        self._callback = _nothing
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


def _nothing() -> None:
    pass


K = TypeVar("K", bound=Hashable)


class Expiries(Generic[K]):
    """Coarse time limits on many short waits (a first packet, a connect): one
    loop timer for all of them, fired every ``resolution`` while any is set.

    A loop timer per wait costs an allocation, a timer-heap insert and a later
    removal; a short-lived connection that arms two of them pays that twice. Here
    setting a limit stores a float and clearing it pops a key; a limit fires up
    to ``resolution`` late, which is nothing against limits of seconds.
    """

    __slots__ = ("_due", "_expired", "_handle", "_loop", "_resolution")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        expired: Callable[[K], None],
        resolution: float = 0.1,
    ) -> None:
        self._loop = loop
        self._expired = expired
        self._resolution = resolution
        self._due: dict[K, float] = {}
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: K, at: float) -> None:
        """``expired(key)`` at loop time ``at`` (or within ``resolution`` after)
        unless cleared before."""
        self._due[key] = at
        if self._handle is None:
            self._handle = self._loop.call_later(self._resolution, self._sweep)

    def clear(self, key: K) -> None:
        self._due.pop(key, None)

    def close(self) -> None:
        self._due.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        due = [key for key, at in self._due.items() if at <= now]
        for key in due:
            # an earlier callback may have cleared or moved this one
            at = self._due.get(key)
            if at is not None and at <= now:
                del self._due[key]
                self._expired(key)
        if self._due and self._handle is None:
            self._handle = self._loop.call_later(self._resolution, self._sweep)
