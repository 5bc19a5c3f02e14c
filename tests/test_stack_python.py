"""The python profile of the stack: lb on the entry port, in front of both backends."""

from __future__ import annotations

import asyncio

import aiohttp

from stack.postgres import connect
from tests.stackctl import StackHandle, hello_instances, profile_stack, prometheus_scrapes, scrape
from tests.test_compose import dashboard_metrics
from tests.test_lb_failover import Load

python_stack = profile_stack("python")


async def test_entry_serves_through_lb(python_stack: StackHandle) -> None:
    entry = f"http://127.0.0.1:{python_stack.ports.entry}"
    async with aiohttp.ClientSession() as http:
        async with http.get(
            entry + "/user/search", params={"first_name": "Ан", "last_name": "К"}
        ) as r:
            assert r.status == 200 and isinstance(await r.json(), list)
        async with http.get(f"http://127.0.0.1:{python_stack.ports.lb_admin}/status") as r:
            pools = (await r.json())["pools"]
        assert [s["name"] for s in pools["users"]] == ["users-backend-1", "users-backend-2"]
        assert [s["name"] for s in pools["hello"]] == ["hello-1", "hello-2"]
        # the second service, by its route (infra/balance/lb.toml)
        assert await hello_instances(http, entry, "python") == {"hello-1", "hello-2"}
    assert "lb" in python_stack.cli("status").stdout


async def test_kill_9_of_a_backend_through_the_entry_every_read_is_200(
    python_stack: StackHandle,
) -> None:
    conn = await connect(python_stack.ports.master, "users")
    try:
        user_id = str(await conn.fetchval("SELECT id FROM users LIMIT 1"))
    finally:
        await conn.close()
    entry = f"http://127.0.0.1:{python_stack.ports.entry}"
    with Load(entry, path=f"/user/get/{user_id}") as load:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(python_stack.kill, "users-backend-1")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(python_stack.start, "users-backend-1")
        await asyncio.sleep(1.5)
        await load.stop()
    assert set(load.statuses) == {200}, load.statuses
    assert load.statuses[200] > 100


async def test_every_metric_of_the_grafana_dashboard_is_served(python_stack: StackHandle) -> None:
    p = python_stack.ports
    served = await scrape(p.backend_1, p.backend_2, p.lb_admin, p.dbproxy_admin)
    wanted = {m for m in dashboard_metrics() if not m.startswith(("haproxy_", "nginx_"))}
    assert wanted <= served, wanted - served


async def test_the_stacks_prometheus_scrapes_every_target(python_stack: StackHandle) -> None:
    health = await prometheus_scrapes(python_stack.ports.prometheus, "lb_responses_total")
    assert set(health) == {"backends", "db-proxy", "http-proxy"}
