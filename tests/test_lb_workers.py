"""lb as a supervisor with workers: one /metrics for the whole server, a worker
killed and replaced, a new generation (SIGUSR2) under load that drops nothing.
Real processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lbctl import Lb, Upstream, lb_with
from tests.lbload import keepalive_clients

WORKERS = 'workers = 2\n\n[health]\ninterval = "200ms"\ntimeout = "200ms"\n'


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Lb, dict[str, Upstream]]]:
    with lb_with(tmp_path, settings=WORKERS) as pair:
        yield pair


def scrape(lb: Lb) -> str:
    with urllib.request.urlopen(lb.admin + "/metrics", timeout=5) as r:
        return r.read().decode()


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{sample} not in /metrics"
    return float(match.group(1))


def worker_pids(lb: Lb) -> list[int]:
    return [w["pid"] for w in lb.status()["workers"]]


def test_one_metrics_for_the_whole_server(
    supervised: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = supervised
    assert len(worker_pids(lb)) == 2
    load = asyncio.run(keepalive_clients(lb.port, 8, 1.5))
    sent = len(load.statuses)
    assert load.failed == 0 and sent > 100
    text = scrape(lb)
    assert value(text, 'lb_request_duration_seconds_count{pool="http"}') == sent
    answered = sum(
        value(text, f'lb_responses_total{{class="2xx",pool="http",server="{name}"}}')
        for name in ("a", "b")
    )
    assert answered == sent
    # both workers served (each answers for its own counters)
    served = [s["total"] for s in lb.status()["pools"]["http"]]
    assert sum(served) == sent
    # the state is the supervisor's, once: not summed over the workers
    assert value(text, 'lb_server_up{pool="http",server="a",state="UP"}') == 1


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(
    supervised: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = supervised
    before = worker_pids(lb)

    async def run() -> object:
        asyncio.get_running_loop().call_later(0.5, os.kill, before[0], signal.SIGKILL)
        return await keepalive_clients(lb.port, 8, 2.0)

    asyncio.run(run())
    deadline = time.monotonic() + 3
    while True:
        after = worker_pids(lb)
        if len(after) == 2 and before[0] not in after:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    assert before[1] in after
    assert f"(pid {before[0]}) died (SIGKILL); starting another" in lb.log_text()
    with urllib.request.urlopen(lb.admin + "/metrics", timeout=5) as r:
        assert value(r.read().decode(), 'lb_worker_deaths_total{how="SIGKILL"}') == 1
    load = asyncio.run(keepalive_clients(lb.port, 4, 0.5))
    assert load.failed == 0 and load.statuses


def test_a_new_generation_under_load_drops_nothing(
    supervised: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = supervised
    before = worker_pids(lb)

    async def run() -> object:
        asyncio.get_running_loop().call_later(1.0, lb.signal, signal.SIGUSR2)
        return await keepalive_clients(lb.port, 16, 4.0)

    load = asyncio.run(run())
    assert load.failed == 0 and load.refused == 0 and len(load.statuses) > 100
    after = lb.status()["workers"]
    assert len(after) == 2 and all(w["generation"] == 2 for w in after)
    assert not set(before) & {w["pid"] for w in after}
    assert "generation 2 ready" in lb.log_text()
