"""Two asyncpg pools and the one rule for using them: retry a broken connection once.

A read whose connection broke (server killed, proxy closed it, connect refused)
is run again on a fresh connection before the request fails; while the stack
has no database proxy, a read can also fall back from the replica to the master.
A write is retried only because every write the service makes is idempotent
(inserts carry a client-made uuid and do nothing on conflict).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from . import consistency
from .errors import DatabaseUnavailable
from .metrics import BackendMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
# How often a read with a consistency token asks the replica again while it waits.
POLL = 0.005
Query = Callable[[asyncpg.Connection], Awaitable[T]]

# What "the connection broke" looks like from asyncpg: the socket failed, the
# server went away (class 08), is shutting down or starting (57P01..57P03), has
# no slot left (53300), or did not answer in time. A session cut in the middle of
# a query can also surface as InternalClientError ("cannot switch to state 12",
# asyncpg issue #1069); seen here on kill -9 of the replica under load.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)


@dataclass(frozen=True, slots=True)
class Attempt:
    label: str
    pool: asyncpg.Pool


class Database:
    def __init__(
        self,
        rw: asyncpg.Pool,
        ro: asyncpg.Pool,
        *,
        metrics: BackendMetrics,
        acquire_timeout: float,
        ro_falls_back_to_rw: bool,
        consistency_wait: float = 0.05,
    ) -> None:
        self.rw = rw
        self._consistency_wait = consistency_wait
        self.ro = ro
        self._metrics = metrics
        self._acquire_timeout = acquire_timeout
        ro_plan = [Attempt("ro", ro), Attempt("ro", ro)]
        if ro_falls_back_to_rw and ro is not rw:
            ro_plan.append(Attempt("rw", rw))
        self._read_plan = tuple(ro_plan)
        self._primary_plan = (Attempt("rw", rw), Attempt("rw", rw))

    async def read(self, query: Query[T], position: str | None = None) -> T:
        """A read that may be served by the replica; with ``position`` (a consistency
        token's, see consistency.py), by the replica only once it has applied that
        position, waiting for it up to consistency_wait, else by the master."""
        if position is None:
            self._metrics.reads.labels("replica").inc()
            return await self._run(self._read_plan, query)
        started = time.monotonic()
        deadline = started + self._consistency_wait

        async def when_applied(conn: asyncpg.Connection) -> tuple[bool, T | None]:
            if not await conn.fetchval(consistency.APPLIED, position):
                return False, None
            return True, await query(conn)

        while True:
            applied, result = await self._run(self._read_plan, when_applied)
            waited = time.monotonic() - started
            if applied:
                self._metrics.consistency_wait.observe(waited)
                served_by = "replica_after_wait" if waited >= POLL else "replica"
                self._metrics.reads.labels(served_by).inc()
                return result  # type: ignore[return-value]
            if time.monotonic() + POLL > deadline:
                break
            await asyncio.sleep(POLL)
        self._metrics.consistency_wait.observe(time.monotonic() - started)
        self._metrics.reads.labels("master_after_wait").inc()
        return await self._run(self._primary_plan, query)

    async def read_primary(self, query: Query[T], why: str = "master") -> T:
        """A read that must see the caller's own writes (login after register), or
        one asked again of the master (``why``: the reads metric's label)."""
        self._metrics.reads.labels(why).inc()
        return await self._run(self._primary_plan, query)

    async def write(self, query: Query[T]) -> tuple[T, str]:
        """A write; ``query`` must be safe to run twice (see the module docstring).
        With its result, the master's WAL position once it committed: what a read
        must see to see it (consistency.py)."""

        async def and_position(conn: asyncpg.Connection) -> tuple[T, str]:
            result = await query(conn)
            return result, await conn.fetchval(consistency.WRITE_POSITION)

        return await self._run(self._primary_plan, and_position)

    async def _run(self, plan: tuple[Attempt, ...], query: Query[T]) -> T:
        failure: BaseException | None = None
        for number, attempt in enumerate(plan):
            if number:
                self._metrics.db_retries.labels(pool=attempt.label).inc()
            try:
                async with attempt.pool.acquire(timeout=self._acquire_timeout) as conn:
                    return await query(conn)
            except CONNECTION_ERRORS as exc:
                failure = exc
                # The other idle connections most likely lead to the same dead
                # server: make the next acquire open a fresh one instead.
                await attempt.pool.expire_connections()
            except asyncpg.exceptions.ReadOnlySQLTransactionError as exc:
                # A write reached a read-only server: the master is not where the
                # rw address points right now. Retrying here cannot help.
                failure = exc
                break
        assert failure is not None
        self._metrics.db_unavailable.labels(pool=plan[-1].label).inc()
        log.warning("database unavailable after %d attempt(s): %r", len(plan), failure)
        raise DatabaseUnavailable() from failure


async def create_pool(
    dsn: str, *, password: str | None, max_size: int, connect_timeout: float, query_timeout: float
) -> asyncpg.Pool:
    # min_size=0: the service starts, and answers /health, while a database is
    # down; connections are made on first use and kept.
    pool = await asyncpg.create_pool(
        dsn,
        password=password,
        min_size=0,
        max_size=max_size,
        timeout=connect_timeout,
        command_timeout=query_timeout,
        max_inactive_connection_lifetime=60.0,
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        pool.terminate()
