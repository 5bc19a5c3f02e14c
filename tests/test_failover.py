"""kill -9 of a database under load, on a stack of its own (these tests break it)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from stack.postgres import connect
from tests.stackctl import StackHandle, running_stack


@pytest.fixture(scope="module")
def fragile_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    with running_stack(Path(tmp_path_factory.mktemp("fragile")), users=3000) as handle:
        yield handle


@pytest.fixture
async def user_ids(fragile_stack: StackHandle) -> list[str]:
    conn = await connect(fragile_stack.ports.master, "users")
    try:
        return [str(r[0]) for r in await conn.fetch("SELECT id FROM users LIMIT 50")]
    finally:
        await conn.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def read_load(
    http: aiohttp.ClientSession, stack: StackHandle, ids: list[str], stop: asyncio.Event
) -> Counter[int]:
    """Reads through both backends, from 4 clients, until ``stop``; statuses counted."""
    statuses: Counter[int] = Counter()

    async def client(n: int) -> None:
        i = n
        while not stop.is_set():
            base = stack.backend_url(i % 2)
            if i % 3:
                url = f"{base}/user/get/{ids[i % len(ids)]}"
            else:
                url = f"{base}/user/search?first_name=А&last_name=К&limit=5"
            async with http.get(url) as r:
                await r.read()
                statuses[r.status] += 1
            i += 4

    await asyncio.gather(*(client(n) for n in range(4)))
    return statuses


async def reads_around(
    http: aiohttp.ClientSession,
    stack: StackHandle,
    ids: list[str],
    action: Callable[[], object],
    seconds_before: float,
    seconds_after: float,
) -> Counter[int]:
    """Statuses of the read load running from before ``action`` until after it."""
    stop = asyncio.Event()
    load = asyncio.create_task(read_load(http, stack, ids, stop))
    await asyncio.sleep(seconds_before)
    await asyncio.to_thread(action)
    await asyncio.sleep(seconds_after)
    stop.set()
    return await load


async def test_replica_kill_9_reads_keep_answering(
    fragile_stack: StackHandle, http: aiohttp.ClientSession, user_ids: list[str]
) -> None:
    statuses = await reads_around(
        http, fragile_stack, user_ids, lambda: fragile_stack.kill("service-db-replica"), 1.0, 2.0
    )
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 100
    # and back: the replica starts again, catches up, and serves reads
    statuses = await reads_around(
        http, fragile_stack, user_ids, lambda: fragile_stack.start("service-db-replica"), 0.5, 1.0
    )
    assert set(statuses) == {200}, statuses
    replica = await connect(fragile_stack.ports.replica, "users")
    try:
        assert await replica.fetchval("SELECT count(*) FROM users") >= 3000
    finally:
        await replica.close()


async def test_master_kill_9_reads_go_on_and_writes_answer_503(
    fragile_stack: StackHandle, http: aiohttp.ClientSession, user_ids: list[str]
) -> None:
    body = {
        "first_name": "Запись",
        "second_name": "Тестова",
        "birthdate": "1999-09-09",
        "password": "p",
    }
    register = fragile_stack.backend_url(0) + "/user/register"
    fragile_stack.kill("service-db")
    try:
        async with http.post(register, json=body) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            answer = await r.json()
            assert answer["code"] == "db_unavailable"
            assert answer["request_id"] == r.headers["X-Request-ID"]
        statuses = await reads_around(http, fragile_stack, user_ids, lambda: None, 1.0, 0.0)
        assert set(statuses) == {200}, statuses
    finally:
        fragile_stack.start("service-db")
    # writes work again once the master is back
    deadline = time.monotonic() + 10
    while True:
        async with http.post(register, json=body) as r:
            if r.status == 200:
                break
        assert time.monotonic() < deadline, "writes did not recover within 10 s"
        await asyncio.sleep(0.2)
    async with http.get(fragile_stack.backend_url(1) + "/metrics") as r:
        assert "users_backend_db_unavailable_total" in await r.text()
