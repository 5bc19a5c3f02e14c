"""Read your own writes over the logical replica, on the real stack (python
profile: lb, dbproxy, both backends): a user who just registered is never "not
found", with the consistency token sent back (header or cookie) and without
it; with the replica held back (its subscription disabled) a read with a token
waits at most the bounded time and the master answers, while reads without a
token keep going to the replica; with no writes nearly every read is the
replica's; and dbproxy shows each replica's applied position."""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from bench.ryw import register_then_get
from stack.postgres import connect as superuser
from tests.stackctl import StackHandle, profile_stack

ryw_stack = profile_stack("python", name="ryw_stack")


def _entry(stack: StackHandle) -> str:
    return f"http://127.0.0.1:{stack.ports.entry}"


async def _reads(stack: StackHandle) -> collections.Counter[str]:
    """users_backend_reads_total by served_by, summed over both backends."""
    counts: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as http:
        for i in range(2):
            async with http.get(f"{stack.backend_url(i)}/metrics") as r:
                text = await r.text()
            for where, value in re.findall(
                r'users_backend_reads_total\{served_by="([a-z_]+)"\} ([0-9.]+)', text
            ):
                counts[where] += int(float(value))
    return counts


async def _pairs(stack: StackHandle, count: int, send_token: bool) -> collections.Counter[int]:
    return await register_then_get(_entry(stack), count, send_token=send_token)


async def test_a_user_read_back_at_once_is_always_found(ryw_stack: StackHandle) -> None:
    before = await _reads(ryw_stack)
    assert await _pairs(ryw_stack, 1000, send_token=True) == {200: 1000}
    assert await _pairs(ryw_stack, 1000, send_token=False) == {200: 1000}
    served = await _reads(ryw_stack) - before
    # the token's reads went to the replica once it had the write; the others
    # to the replica, and to the master when the replica had not the user yet
    assert served["replica"] + served["replica_after_wait"] >= 1500, served
    assert set(served) <= {
        "replica",
        "replica_after_wait",
        "master_after_wait",
        "master_after_miss",
    }


async def test_the_cookie_carries_the_token_for_a_browser(ryw_stack: StackHandle) -> None:
    entry = _entry(ryw_stack)
    async with aiohttp.ClientSession() as http:  # keeps cookies, as a browser does
        body = {
            "first_name": "Кук",
            "second_name": "Ки",
            "birthdate": "1990-01-01",
            "password": "p",
        }
        async with http.post(entry + "/user/register", json=body) as r:
            user_id = (await r.json())["user_id"]
            assert r.cookies["balance_consistency"].value == r.headers["X-Consistency-Token"]
        params = {"first_name": "Кук", "last_name": "Ки"}
        async with http.get(entry + "/user/search", params=params) as r:
            assert user_id in [u["id"] for u in await r.json()]


@asynccontextmanager
async def _replica_held_back(stack: StackHandle) -> AsyncIterator[None]:
    conn = await superuser(stack.ports.replica, "users")
    try:
        await conn.execute("ALTER SUBSCRIPTION users_sub DISABLE")
        yield
    finally:
        await conn.execute("ALTER SUBSCRIPTION users_sub ENABLE")
        await conn.close()


async def _wait_seconds(stack: StackHandle) -> list[float]:
    """The consistency waits' histogram (users_backend_consistency_wait_seconds):
    the upper bound of every bucket that holds a wait, over both backends."""
    async with aiohttp.ClientSession() as http:
        bounds = collections.Counter()
        for i in range(2):
            async with http.get(f"{stack.backend_url(i)}/metrics") as r:
                text = await r.text()
            for le, value in re.findall(
                r'users_backend_consistency_wait_seconds_bucket\{le="([0-9.e+inf]+)"\} ([0-9.]+)',
                text,
            ):
                bounds[le] += float(value)
    return [float(le) for le, n in bounds.items() if n]


async def test_with_the_replica_held_back_the_master_answers_after_the_bounded_wait(
    ryw_stack: StackHandle,
) -> None:
    before = await _reads(ryw_stack)
    async with _replica_held_back(ryw_stack):
        await asyncio.sleep(0.5)
        statuses = await _pairs(ryw_stack, 300, send_token=True)
        untoken = await _pairs(ryw_stack, 300, send_token=False)
        # a read without a token of a user the replica has: the replica's, within its lag
        async with aiohttp.ClientSession() as http:
            params = {"first_name": "А", "last_name": "К", "limit": "5"}
            for _ in range(200):
                async with http.get(_entry(ryw_stack) + "/user/search", params=params) as r:
                    assert r.status == 200
    assert statuses == {200: 300} and untoken == {200: 300}
    served = await _reads(ryw_stack) - before
    assert served["master_after_wait"] == 300, served  # the replica never reached a token
    assert served["master_after_miss"] == 300, served  # it never had the new users either
    assert served["replica"] >= 200, served  # the searches
    # no read waited past the bound (50 ms) by more than a poll and a query
    assert max(await _wait_seconds(ryw_stack)) <= 0.1


async def test_with_no_writes_reads_are_the_replicas(ryw_stack: StackHandle) -> None:
    await asyncio.sleep(1)  # the replica has caught up with the tests before
    before = await _reads(ryw_stack)
    async with aiohttp.ClientSession() as http:
        params = {"first_name": "Е", "last_name": "С", "limit": "5"}
        for _ in range(300):
            async with http.get(_entry(ryw_stack) + "/user/search", params=params) as r:
                users = await r.json()
        for user in users:
            async with http.get(f"{_entry(ryw_stack)}/user/get/{user['id']}") as r:
                assert r.status == 200
    served = await _reads(ryw_stack) - before
    assert served["replica"] >= 0.95 * sum(served.values()), served


async def test_dbproxy_shows_each_replicas_applied_position(ryw_stack: StackHandle) -> None:
    port = ryw_stack.ports.dbproxy_admin
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/status") as r:
            servers = {s["name"]: s for s in (await r.json())["pools"]["postgres"]}
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            metrics = await r.text()
    lag = servers["service-db-replica"]["lag"]
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", lag["applied_lsn"]), lag
    assert 'dbproxy_replica_applied_lsn_bytes{server="service-db-replica"}' in metrics
