"""Active checks: one loop per server, every interval, each probe bounded by a timeout.

The probe is the proxy's own (an HTTP GET for lb, a Postgres login and query for
dbproxy); this module only schedules it and feeds the result to the server's
rise/fall state machine.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .servers import CheckRecord, Server, ServerSet

log = logging.getLogger("balance.health")

Probe = Callable[[Server, float], Awaitable[str]]
"""Checks one server within the timeout: a short detail, or raises when it is not healthy."""


class CheckFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class CheckTiming:
    interval: float = 1.0
    timeout: float = 0.5


class HealthChecker:
    def __init__(
        self,
        servers: ServerSet,
        probe: Probe,
        timing: CheckTiming,
        after_check: Callable[[Server, CheckRecord], None] | None = None,
    ) -> None:
        self._servers = servers
        self._probe = probe
        self.timing = timing
        self._after_check = after_check
        self._tasks: dict[Server, asyncio.Task[None]] = {}

    def sync(self) -> None:
        """Start loops for new servers, stop them for removed ones (after start and each reload)."""
        current = set(self._servers)
        for server in list(self._tasks):
            if server not in current:
                self._tasks.pop(server).cancel()
        for server in current:
            if server not in self._tasks:
                self._tasks[server] = asyncio.create_task(
                    self._loop(server), name=f"check {server.name}"
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check_once(self, server: Server) -> CheckRecord:
        started = time.monotonic()
        timeout = self.timing.timeout
        timed_out = False
        try:
            async with asyncio.timeout(timeout):
                detail = await self._probe(server, timeout)
            ok = True
        except TimeoutError:
            ok, detail, timed_out = False, f"no answer within {timeout * 1000:.0f}ms", True
        except asyncio.CancelledError:
            raise
        except CheckFailed as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # a probe that breaks is a failed check, not a dead loop
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        record = CheckRecord(ok, detail, time.monotonic() - started, time.time(), timed_out)
        server.record_check(record)
        if self._after_check is not None:
            self._after_check(server, record)
        return record

    async def check_all(self) -> None:
        """One check of every server now (at start, so roles are known before the first session)."""
        await asyncio.gather(*(self.check_once(s) for s in self._servers))

    async def _loop(self, server: Server) -> None:
        # Spread the first checks so that servers are not all probed at once.
        await asyncio.sleep(random.uniform(0, min(self.timing.interval, 0.2)))
        while True:
            started = time.monotonic()
            await self.check_once(server)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.timing.interval - elapsed))
