"""The seed's failure drill on the python profile: kill -9 under load at the HTTP entry."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.stackctl import StackHandle, running_stack
from tests.test_lb_failover import Load

WRITE = {"first_name": "Дрилл", "second_name": "Тестов", "birthdate": "1990-01-01", "password": "p"}
# dbproxy's documented check timing (infra/balance/dbproxy.toml): a master back is
# writable again within rise x interval, plus one interval for the check's phase.
RISE, INTERVAL = 2, 1.0


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    with running_stack(
        Path(tmp_path_factory.mktemp("drill")), users=2000, extra=["--proxies", "python"]
    ) as h:
        yield h


def entry(stack: StackHandle) -> str:
    return f"http://127.0.0.1:{stack.ports.entry}"


async def write(stack: StackHandle) -> aiohttp.ClientResponse:
    async with (
        aiohttp.ClientSession() as http,
        http.post(entry(stack) + "/user/register", json=WRITE) as r,
    ):
        await r.read()
        return r


async def test_kill_9_of_the_replica_no_read_fails(drill: StackHandle) -> None:
    with Load(entry(drill), path="/user/search?first_name=А&last_name=К&limit=5") as load:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(drill.kill, "service-db-replica")
        await asyncio.sleep(1.5)
        assert (await write(drill)).status == 200  # writes never needed the replica
        await asyncio.to_thread(drill.start, "service-db-replica")
        await asyncio.sleep(1.5)
        await load.stop()
    assert set(load.statuses) == {200}, load.statuses
    assert load.statuses[200] > 100


async def test_kill_9_of_the_master_reads_go_on_writes_503_then_recover(drill: StackHandle) -> None:
    statuses: Counter[int] = Counter()
    with Load(entry(drill), path="/user/search?first_name=А&last_name=К&limit=5") as load:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(drill.kill, "service-db")
        await asyncio.sleep(1.0)
        for _ in range(3):
            r = await write(drill)
            statuses[r.status] += 1
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        await asyncio.to_thread(drill.start, "service-db")
        started = time.monotonic()
        while (await write(drill)).status != 200:
            assert time.monotonic() - started < RISE * INTERVAL + INTERVAL + 1.5, (
                "writes did not recover"
            )
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await load.stop()
    assert set(load.statuses) == {200}, load.statuses
