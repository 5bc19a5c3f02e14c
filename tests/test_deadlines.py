"""proxycore.deadline: a connection's resettable Deadline and the shared Expiries.

Driven on a real uvloop loop with short times. They check what fires and what
does not, and that a deadline never fires before it is due; how late it may be
is a resolution, not a speed, and is only bounded loosely.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import uvloop

from proxycore.deadline import Deadline, Expiries


def run(main) -> None:  # type: ignore[no-untyped-def]
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main(loop))
    finally:
        loop.close()


class Owner:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fired: list[float] = []
        self.loop = loop
        self.deadline = Deadline(loop, self.expired)

    def expired(self) -> None:
        self.fired.append(self.loop.time())


def test_a_deadline_fires_once_when_due_and_never_before() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        owner = Owner(loop)
        start = loop.time()
        owner.deadline.after(0.05)
        await asyncio.sleep(0.3)
        assert len(owner.fired) == 1 and owner.fired[0] >= start + 0.05
        assert not owner.deadline.armed

    run(main)


def test_a_deadline_moved_later_fires_at_the_new_time() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        owner = Owner(loop)
        start = loop.time()
        owner.deadline.after(0.05)
        owner.deadline.at(start + 0.2)  # later: the armed timer re-arms when it fires
        await asyncio.sleep(0.1)
        assert owner.fired == []
        await asyncio.sleep(0.3)
        assert len(owner.fired) == 1 and owner.fired[0] >= start + 0.2

    run(main)


def test_a_cancelled_or_stopped_deadline_does_not_fire() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        cancelled, stopped = Owner(loop), Owner(loop)
        cancelled.deadline.after(0.05)
        cancelled.deadline.cancel()
        stopped.deadline.after(0.05)
        stopped.deadline.stop()
        await asyncio.sleep(0.2)
        assert cancelled.fired == [] and stopped.fired == []

    run(main)


def test_a_stopped_deadline_lets_its_owner_go_without_the_collector() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        owner = Owner(loop)
        owner.deadline.after(10)
        gone = weakref.ref(owner)
        owner.deadline.stop()
        gc.disable()
        try:
            del owner
            assert gone() is None  # freed by reference counting: no cycle left
        finally:
            gc.enable()

    run(main)


def test_expiries_fire_due_keys_only_and_never_early() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[tuple[str, float]] = []
        limits: Expiries[str] = Expiries(loop, lambda key: fired.append((key, loop.time())), 0.02)
        start = loop.time()
        limits.set("soon", start + 0.05)
        limits.set("cleared", start + 0.05)
        limits.set("moved", start + 0.05)
        limits.set("later", start + 5)
        limits.clear("cleared")
        limits.set("moved", start + 0.25)  # setting again moves it
        await asyncio.sleep(0.15)
        assert [key for key, _ in fired] == ["soon"] and fired[0][1] >= start + 0.05
        await asyncio.sleep(0.3)
        assert [key for key, _ in fired] == ["soon", "moved"] and fired[1][1] >= start + 0.25
        assert len(limits) == 1  # "later" still waits
        limits.close()
        assert len(limits) == 0

    run(main)


def test_an_expiry_may_clear_another_that_is_due_in_the_same_sweep() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        fired: list[str] = []
        limits: Expiries[str] = Expiries(loop, lambda key: expired(key), 0.02)

        def expired(key: str) -> None:
            fired.append(key)
            limits.clear("b" if key == "a" else "a")  # e.g. a session closing its peer

        now = loop.time()
        limits.set("a", now + 0.01)
        limits.set("b", now + 0.01)
        await asyncio.sleep(0.2)
        assert len(fired) == 1 and len(limits) == 0

    run(main)
