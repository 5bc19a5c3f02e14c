"""Relayed sessions waiting for a session slot: a burst waits, it does not fail
(HAProxy: server maxconn + timeout queue). One queue per listener, first come
first served; a freed slot wakes the heads on the loop's next turn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from typing import Any

from proxycore.deadline import Expiries
from proxycore.histogram import Histogram
from proxycore.servers import Server

from .listener import Listener
from .settings import QueueSettings

# the server with a free slot for a session of the listener, not one of those tried
Chooser = Callable[[Listener, Collection[Server]], Server | None]


def _late(session: Any) -> None:
    session.queue_late()


class SessionQueue:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Callable[[], QueueSettings],
        listeners: Callable[[], Iterable[Listener]],
        choose_with_room: Chooser,
    ) -> None:
        self.loop = loop
        self._settings = settings
        self._listeners = listeners
        self._choose = choose_with_room
        self.limits: Expiries[Any] = Expiries(loop, _late)
        self.queued = 0  # sessions waiting in the listeners' queues
        self.timeouts = 0
        self.refused = 0
        self.abandoned = 0  # sessions whose client left while they waited
        self.wait = Histogram()
        self._wake_due = False

    def enqueue(self, session: Any) -> None:
        settings = self._settings()
        if self.queued >= settings.max_queue:
            self.refused += 1
            session.refuse_as_server(
                "53300",
                f"dbproxy: every server for listener '{session.listener.name}' is at its "
                f"max_sessions and {settings.max_queue} sessions wait already",
            )
            return
        now = self.loop.time()
        session.queued = True
        session.queued_at = now
        self.queued += 1
        session.listener.queued += 1
        session.listener.queue.append(session)
        self.limits.set(session, now + settings.timeout)

    def left(self, session: Any) -> None:
        """``session`` stops waiting: served, timed out or gone (dropped lazily)."""
        if session.queued:
            session.queued = False
            self.queued -= 1
            session.listener.queued -= 1
            self.limits.clear(session)
            self.wait.observe(self.loop.time() - session.queued_at)

    def lengths(self) -> dict[str, int]:
        return {listener.name: listener.queued for listener in self._listeners()}

    def slot_freed(self) -> None:
        """A session or a dial ended: the queues' heads may go, on the loop's next turn."""
        if self.queued and not self._wake_due:
            self._wake_due = True
            self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        for listener in self._listeners():
            queue = listener.queue
            while queue:
                session = queue[0]
                if not session.queued or session.closed:
                    queue.popleft()
                    continue
                server = self._choose(listener, session.failed)
                if server is None:
                    break  # first come, first served: the head waits on
                queue.popleft()
                session.dequeued(server)

    def close(self) -> None:
        self.limits.close()
