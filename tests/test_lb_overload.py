"""Overload is not failure: lb holds requests past a server's max_conns in a queue,
answers 503 + Retry-After (never 502) when the wait runs out, and a burst never
ejects a healthy server. Real lb and upstream processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.lbctl import lb_with

QUEUE = """
[health]
interval = "200ms"
timeout = "200ms"

[queue]
max_conns = 2
timeout = "{timeout}"
"""


async def get_all(url: str, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:

        async def one() -> tuple[int, dict[str, str], bytes]:
            async with http.get(url) as r:
                return r.status, dict(r.headers), await r.read()

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_requests_past_max_conns_wait_for_a_slot(tmp_path: Path) -> None:
    with lb_with(tmp_path, names=("a",), settings=QUEUE.format(timeout="10s")) as (lb, _):
        burst = asyncio.create_task(get_all(lb.url + "/slow?s=0.4", 6))
        busiest, longest_queue = 0, 0
        while not burst.done():  # the server never holds more than max_conns
            status = await asyncio.to_thread(lb.status)
            busiest = max(busiest, status["pools"]["http"][0]["active"])
            longest_queue = max(longest_queue, status["queue"]["length"])
            await asyncio.sleep(0.05)
        assert [s for s, _, _ in await burst] == [200] * 6
        assert busiest == 2 and longest_queue >= 1
        assert lb.server_status("a")["state"] == "UP"


async def test_a_wait_past_the_queue_timeout_is_503_with_retry_after(tmp_path: Path) -> None:
    with lb_with(tmp_path, names=("a",), settings=QUEUE.format(timeout="300ms")) as (lb, _):
        answers = await get_all(lb.url + "/slow?s=1", 3)
        statuses = sorted(s for s, _, _ in answers)
        assert statuses == [200, 200, 503]
        _, headers, body = next(a for a in answers if a[0] == 503)
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["code"] == "queue_timeout"
        assert lb.status()["queue"]["timeouts"] == 1
        assert lb.server_status("a")["state"] == "UP"  # busy is not down


@pytest.mark.skipif(shutil.which("wrk") is None, reason="`make setup` installs wrk")
def test_a_connection_surge_ejects_no_server_and_gets_no_5xx(tmp_path: Path) -> None:
    """2,000 keep-alive clients at once on two small upstreams: the burst waits in
    lb's queue; no connect storm, no server out, every answer 2xx."""
    with lb_with(tmp_path, settings="[queue]\nmax_conns = 16\nmax_connecting = 4\n") as (lb, _):
        out = subprocess.run(
            ["wrk", "-t1", "-c2000", "-d4s", "--timeout", "15s", lb.url + "/"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "requests in" in out, out
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        assert all(s["state"] == "UP" for s in lb.status()["pools"]["http"])
        assert "is now DOWN" not in lb.log_text()
