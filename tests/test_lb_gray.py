"""Gray failures in lb: a server that stops answering without dying (SIGSTOP), a
slow one, and a stop of lb itself under load. Real lb and upstream processes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.lbctl import Lb, Upstream, lb_with
from tests.lbload import Load, keepalive_clients, metric, requests_seen
from tests.rawhttp import read_response
from tests.silent import full_backlog

GRAY = """
hedge_after = "200ms"

[health]
interval = "200ms"
timeout = "200ms"
rise = 2
fall = 2
"""


@pytest.fixture
def gray(tmp_path: Path) -> Iterator[tuple[Lb, dict[str, Upstream]]]:
    with lb_with(tmp_path, settings=GRAY) as pair:
        yield pair


async def test_a_frozen_server_costs_no_get_more_than_a_second(
    gray: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, upstreams = gray
    await keepalive_clients(lb.port, 4, 0.5)  # warm: pools, both servers seen up
    loop = asyncio.get_running_loop()
    upstreams["a"].signal(signal.SIGSTOP)
    thaw = loop.call_later(2.5, upstreams["a"].signal, signal.SIGCONT)
    try:
        load = await keepalive_clients(lb.port, 16, 4.0)
    finally:
        thaw.cancel()
        upstreams["a"].signal(signal.SIGCONT)
    assert load.failed == 0 and len(load.statuses) > 100
    assert max(load.latencies) < 1.0
    assert await asyncio.to_thread(metric, lb, "lb_hedges_total") > 0
    assert await asyncio.to_thread(metric, lb, "lb_hedge_wins_total") > 0


async def test_a_post_is_never_hedged(gray: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, upstreams = gray
    upstreams["a"].signal(signal.SIGSTOP)
    try:

        async def post(n: int) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            body = b'{"n": %d}' % n
            writer.write(
                b"POST /echo/post-%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                % (n, len(body), body)
            )
            try:
                return (await asyncio.wait_for(read_response(reader), 10)).status
            finally:
                writer.close()

        # round robin puts one of the two on the frozen server
        posts = asyncio.gather(post(1), post(2))
        await asyncio.sleep(0.8)  # hedge_after (200ms) is long past
        upstreams["a"].signal(signal.SIGCONT)
        assert await posts == [200, 200]
    finally:
        upstreams["a"].signal(signal.SIGCONT)
    seen = []
    for upstream in upstreams.values():
        posts = await asyncio.to_thread(requests_seen, upstream)
        seen += [s["path"] for s in posts if s["method"] == "POST"]
    assert sorted(seen) == ["/echo/post-1", "/echo/post-2"]  # each reached one server, once
    assert await asyncio.to_thread(metric, lb, "lb_hedges_total") == 0


def test_mark_down_moves_the_requests_waiting_on_the_server(tmp_path: Path) -> None:
    settings = GRAY.replace('hedge_after = "200ms"', 'hedge_after = "off"')
    with lb_with(tmp_path, settings=settings) as (lb, upstreams):
        asyncio.run(keepalive_clients(lb.port, 2, 0.5))
        upstreams["a"].signal(signal.SIGSTOP)
        try:
            load = asyncio.run(keepalive_clients(lb.port, 4, 2.0))
        finally:
            upstreams["a"].signal(signal.SIGCONT)
        assert load.failed == 0
        # waited only until the checks marked the server down, not first_byte (10 s)
        assert max(load.latencies) < 2.0
        assert metric(lb, "lb_requests_moved_total") > 0
        assert metric(lb, "lb_hedges_total") == 0


def test_the_retry_budget_holds_hedges_back_when_every_server_is_slow(tmp_path: Path) -> None:
    settings = 'hedge_after = "100ms"\n[retry_budget]\npercent = 0\nmin_concurrency = 1\n'
    with lb_with(tmp_path, settings=settings) as (lb, _):
        load = asyncio.run(keepalive_clients(lb.port, 8, 1.5, path="/slow?s=0.5"))
        assert load.failed == 0
        hedges = metric(lb, "lb_hedges_total")
        assert 0 < hedges < len(load.statuses)  # one hedge at a time, at most
        assert metric(lb, 'lb_retry_budget_exhausted_total{pool="http",reason="concurrency"}') > 0
        assert metric(lb, 'lb_retry_budget_active{pool="http"}') == 0


def test_sigterm_under_load_answers_every_request_sent(tmp_path: Path) -> None:
    with lb_with(tmp_path, settings=GRAY) as (lb, _):

        async def run() -> Load:
            loop = asyncio.get_running_loop()
            loop.call_later(1.0, lb.signal, signal.SIGTERM)
            return await keepalive_clients(lb.port, 16, 4.0)

        load = asyncio.run(run())
        assert lb.proc is not None
        assert lb.proc.wait(timeout=15) == 0
    # every request written got its whole response; after the stop, connects are refused
    assert load.failed == 0 and len(load.statuses) > 100
    assert load.refused == 16


def test_a_connect_that_hangs_is_dialled_elsewhere_after_hedge_after(tmp_path: Path) -> None:
    """A frozen server whose accept queue is full drops the SYN: a connect to it
    would hang for timeouts.connect. After hedge_after another server is dialled
    beside it, for any method: nothing was sent yet."""
    settings = (
        'hedge_after = "200ms"\n[timeouts]\nconnect = "5s"\n'
        "[health]\nenabled = false\n[upstream_keepalive]\nmax_idle = 0\n"
    )
    with full_backlog() as hole, lb_with(tmp_path, names=("a",), settings=settings) as (lb, _):
        text = lb.config.read_text()
        lb.config.write_text(
            text.replace(
                "[[server]]",
                f'[[server]]\nname = "hole"\naddress = "127.0.0.1:{hole}"\n\n[[server]]',
                1,
            )
        )
        lb.signal(signal.SIGHUP)
        time.sleep(0.5)

        async def run() -> list[tuple[int, float]]:
            async with aiohttp.ClientSession() as http:

                async def one(method: str) -> tuple[int, float]:
                    started = time.monotonic()
                    async with http.request(method, lb.url + "/echo", data=b"x") as r:
                        await r.read()
                        return r.status, time.monotonic() - started

                return await asyncio.gather(*(one(m) for m in ("GET", "POST") * 3))

        answers = asyncio.run(run())
    assert [s for s, _ in answers] == [200] * 6
    assert max(t for _, t in answers) < 2.0  # not the 5 s connect timeout
    assert "connect to hole slow" in lb.log_text()
