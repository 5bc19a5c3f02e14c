"""The two clusters: schema, index, roles, replication, read-only replica."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg
import pytest

from stack.postgres import connect
from tests.stackctl import StackHandle

SEARCH = (
    "SELECT id FROM users WHERE first_name >= 'Ив' AND first_name < 'Иг'"
    " AND second_name >= 'Пе' AND second_name < 'Пж' ORDER BY id LIMIT 50"
)


@pytest.mark.parametrize("cluster", ["master", "replica"])
async def test_prefix_search_uses_the_name_index(stack: StackHandle, cluster: str) -> None:
    conn = await connect(getattr(stack.ports, cluster), "users")
    try:
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + SEARCH))
        assert "users_name_prefix_idx" in plan, plan
        assert "Seq Scan" not in plan, plan
        # The service's statement is prepared; its generic plan must use the index too.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(
            "PREPARE s(text, text, text, text, int) AS SELECT id FROM users"
            " WHERE first_name >= $1 AND first_name < $2 AND second_name >= $3"
            " AND second_name < $4 ORDER BY id LIMIT $5"
        )
        rows = await conn.fetch("EXPLAIN EXECUTE s('Ив', 'Иг', 'Пе', 'Пж', 50)")
        plan = "\n".join(r[0] for r in rows)
        assert "users_name_prefix_idx" in plan, plan
    finally:
        await conn.close()


async def test_master_and_replica_hold_the_seed(stack: StackHandle) -> None:
    from tests.conftest import SESSION_USERS

    for port in (stack.ports.master, stack.ports.replica):
        conn = await connect(port, "users")
        try:
            assert await conn.fetchval("SELECT count(*) FROM users") >= SESSION_USERS
        finally:
            await conn.close()


def password_of(stack: StackHandle, user: str) -> str:
    creds = stack.state()["topology"]["credentials"]
    return creds[{"users_app": "app_password", "balance_check": "check_password"}[user]]


async def connect_as(
    stack: StackHandle, port: int, user: str, password: str | None = None
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=user,
        password=password_of(stack, user) if password is None else password,
        database="users",
    )


async def test_replica_is_logical_and_read_only(stack: StackHandle) -> None:
    app = await connect_as(stack, stack.ports.replica, "users_app")
    try:
        assert await app.fetchval("SHOW default_transaction_read_only") == "on"
        assert await app.fetchval("SELECT pg_is_in_recovery()") is False
        with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
            await app.execute("DELETE FROM users WHERE false")
    finally:
        await app.close()
    master = await connect(stack.ports.master, "users")
    try:
        assert await master.fetchval("SHOW wal_level") == "logical"
        assert await master.fetchval("SELECT count(*) FROM pg_publication") == 1
    finally:
        await master.close()


async def test_roles_log_in_by_password_only(stack: StackHandle) -> None:
    for user in ("users_app", "balance_check"):
        await (await connect_as(stack, stack.ports.master, user)).close()
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await connect_as(stack, stack.ports.master, user, password="nope")
    check = await connect_as(stack, stack.ports.master, "balance_check")
    try:
        # pg_monitor: the checks can read the lag of the replica's slot
        rows = await check.fetch(
            "SELECT application_name, replay_lsn IS NOT NULL AS seen FROM pg_stat_replication"
        )
        assert [tuple(r) for r in rows] == [("users_sub", True)]
    finally:
        await check.close()


async def test_registered_user_reaches_the_replica(stack: StackHandle) -> None:
    async with aiohttp.ClientSession() as http:
        body = {
            "first_name": "Реплика",
            "second_name": "Проверкина",
            "birthdate": "2000-01-01",
            "password": "pw",
        }
        async with http.post(stack.backend_url(1) + "/user/register", json=body) as r:
            assert r.status == 200
            user_id = (await r.json())["user_id"]
    replica = await connect(stack.ports.replica, "users")
    try:
        deadline = time.monotonic() + 5
        while (
            await replica.fetchval("SELECT count(*) FROM users WHERE id = $1::uuid", user_id) == 0
        ):
            assert time.monotonic() < deadline, "the replica did not get the user within 5 s"
            await asyncio.sleep(0.05)
    finally:
        await replica.close()
