"""Brownouts and crowds on real lb and upstream processes, with lb's shipped
policies: a slow server, a server failing fast, every server slow, a frozen one
found by its silence, and a crowd that leaves while it waits. What is checked
is where requests went and what they cost the servers, from the upstreams' own
counts, not how long they took. (The policies alone: tests/test_lb_tails.py;
the measurements beside nginx and HAProxy: `python -m bench gray`.)"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.lbctl import FAST_CHECKS, Upstream, lb_with
from tests.lbload import keepalive_clients, metric, requests_seen
from tests.rawhttp import get


def seen(upstreams: dict[str, Upstream], path: str = "/shaped") -> dict[str, int]:
    """Requests for ``path`` each upstream received (hedges and retries too)."""
    return {
        name: sum(s["path"].startswith(path) for s in requests_seen(u))
        for name, u in upstreams.items()
    }


def test_a_slow_server_gets_little_traffic_and_stays_up(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, upstreams):
        load = asyncio.run(keepalive_clients(lb.port, 8, 3.0, path="/shaped?slow=a&s=1.5"))
        counts = seen(upstreams)
        assert load.failed == 0 and len(load.statuses) > 200
        # peak-EWMA: a few requests find a slow (and are hedged away), the rest go to b
        assert counts["a"] <= 0.02 * len(load.statuses), counts
        assert sum(counts.values()) <= 1.10 * len(load.statuses), counts
        # silent while it works on them, but it answers its check: slow, not frozen
        assert lb.server_status("a")["state"] == "UP"


def test_a_server_that_fails_fast_gets_no_traffic(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, upstreams):
        asyncio.run(keepalive_clients(lb.port, 8, 0.5, path="/shaped?fail=a"))  # it shows itself
        load = asyncio.run(keepalive_clients(lb.port, 8, 3.0, path="/shaped?fail=a"))
        assert len(load.statuses) > 200
        # answering in no time, it is still not "fast": a failure counts as slow
        assert load.statuses.count(200) >= 0.999 * len(load.statuses), load.failed
        assert seen(upstreams)["a"] <= 0.01 * len(load.statuses)
        assert lb.server_status("a")["state"] == "UP"  # its checks pass all along


def test_when_every_server_is_slow_hedges_pause_and_cost_little(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, upstreams):
        load = asyncio.run(keepalive_clients(lb.port, 16, 5.0, path="/shaped?slow=a,b&s=0.4"))
        counts = seen(upstreams)
        assert load.failed == 0 and len(load.statuses) > 100
        # the second server is as slow as the first: hedges lose, and pause
        assert metric(lb, 'lb_hedging_paused{pool="http"}') == 1
        assert metric(lb, 'lb_pool_hedges_total{outcome="won",pool="http"}') == 0
        assert sum(counts.values()) <= 1.10 * len(load.statuses), counts


def test_a_silent_server_leaves_the_rotation_before_its_checks_notice(tmp_path: Path) -> None:
    """Checks every 5 s: only the stall watch can take a frozen server out soon.
    (Round robin, so that requests keep going to it: peak_ewma may send it none.)"""
    slow_checks = 'method = "round_robin"\n' + FAST_CHECKS.replace(
        'interval = "200ms"', 'interval = "5s"'
    )
    with lb_with(tmp_path, settings=slow_checks) as (lb, upstreams):
        asyncio.run(keepalive_clients(lb.port, 4, 0.5))
        upstreams["a"].signal(signal.SIGSTOP)
        try:

            async def run() -> float:
                stopped = time.monotonic()
                load = asyncio.create_task(keepalive_clients(lb.port, 4, 3.0))
                while lb.server_status("a")["state"] != "DOWN":
                    assert time.monotonic() - stopped < 2.5, "still in rotation"
                    await asyncio.sleep(0.05)
                down = time.monotonic() - stopped
                assert (await load).failed == 0
                return down

            down = asyncio.run(run())
        finally:
            upstreams["a"].signal(signal.SIGCONT)
        assert down < 2.5  # the checks alone: fall (2) x interval (5 s)
        assert "and no answer to its check within 0.2s" in lb.log_text()
        assert metric(lb, "lb_hedges_total") > 0  # what waited there was hedged meanwhile


def test_requests_whose_client_left_leave_the_queue_at_once(tmp_path: Path) -> None:
    """One slot a server and both busy: a crowd queues, then gives up and closes.
    The queue empties then, not at queue.timeout (10 s), and the next request
    gets the first free slot."""
    settings = FAST_CHECKS + "\n[queue]\nmax_conns = 1\n"
    with lb_with(tmp_path, settings=settings) as (lb, _):

        async def run() -> None:
            busy = [asyncio.open_connection("127.0.0.1", lb.port) for _ in range(2)]
            held = [await c for c in busy]
            for _, writer in held:
                writer.write(get("/slow?s=3"))
            await asyncio.sleep(0.3)
            crowd = [await asyncio.open_connection("127.0.0.1", lb.port) for _ in range(50)]
            for _, writer in crowd:
                writer.write(get("/"))
            await asyncio.sleep(0.5)
            assert await asyncio.to_thread(metric, lb, "lb_queue_length") == 50
            for _, writer in crowd:
                writer.close()
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(metric, lb, "lb_queue_length") == 0
            assert await asyncio.to_thread(metric, lb, "lb_queue_abandoned_total") == 50
            for _, writer in held:
                writer.close()

        asyncio.run(run())
        load = asyncio.run(keepalive_clients(lb.port, 2, 0.5))
        assert load.failed == 0 and load.statuses
        # every request sent had its wait before dispatch measured; the gone ones none
        assert metric(lb, "lb_dispatch_wait_seconds_count") >= len(load.statuses)
