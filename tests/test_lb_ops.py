"""Operating lb: admin API, metrics, reload, graceful stop, command line."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

from stack.pki import authority
from tests.lbctl import FAST_CHECKS, Lb, Upstream, lb_with, spawn_lb, stop, wait_port, write_config
from tests.rawhttp import closed_by_peer, get, read_response
from tests.stackctl import REPO, free_ports


async def _busy_server(lb: Lb) -> str:
    for _ in range(100):
        busy = [s["name"] for s in lb.status()["pools"]["http"] if s["active"]]
        if busy:
            return busy[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no request in flight")


async def test_drain_lets_in_flight_finish_and_sends_nothing_new(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, _):
        async with aiohttp.ClientSession() as http:
            slow = asyncio.create_task(http.get(lb.url + "/slow?s=1.5"))
            name = await _busy_server(lb)
            async with http.post(f"{lb.admin}/servers/{name}/drain") as r:
                assert r.status == 200 and (await r.json())["state"] == "DRAIN"
            for _ in range(10):
                async with http.get(lb.url + "/") as r:
                    assert r.headers["X-Upstream"] != name
            response = await slow
            assert response.status == 200 and response.headers["X-Upstream"] == name
            async with http.post(f"{lb.admin}/servers/{name}/enable") as r:
                assert (await r.json())["state"] == "UP"
            seen = set()
            for _ in range(4):
                async with http.get(lb.url + "/") as r:
                    seen.add(r.headers["X-Upstream"])
            assert name in seen
            async with http.post(f"{lb.admin}/servers/{name}/disable") as r:
                assert (await r.json())["state"] == "MAINT"
            async with http.post(f"{lb.admin}/servers/nope/drain") as r:
                assert r.status == 404 and "no server named" in (await r.json())["message"]
            async with http.post(f"{lb.admin}/servers/{name}/explode") as r:
                assert r.status == 404


async def test_metrics_status_and_page(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, _):
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                async with http.get(lb.url + "/") as r:
                    await r.read()
            await asyncio.sleep(0.5)  # a few checks
            async with http.get(lb.admin + "/metrics") as r:
                text = await r.text()
            for needle in (
                'lb_responses_total{class="2xx",pool="http",server="a"}',
                'lb_route_responses_total{class="2xx",pool="http",route="default"} 4.0',
                "lb_request_duration_seconds_bucket",
                "lb_retries_total",
                'lb_server_up{pool="http",server="a",state="UP"} 1.0',
                'lb_checks_total{pool="http",result="ok",server="a"}',
                "lb_check_duration_seconds",
                "lb_in_flight",
                "lb_server_passive_failures_total",
                "lb_client_connections",
            ):
                assert needle in text, needle
            served = re.findall(
                r'^lb_responses_total\{class="2xx",pool="http",server="[ab]"\} (\S+)$', text, re.M
            )
            assert sum(float(n) for n in served) == 4.0
            async with http.get(lb.admin + "/status") as r:
                status = await r.json()
            a = next(s for s in status["pools"]["http"] if s["name"] == "a")
            assert a["state"] == "UP" and a["last_check"]["ok"]
            assert sum(s["total"] for s in status["pools"]["http"]) == 4
            assert a["in_state_seconds"] >= 0 and a["weight"] == 1
            async with http.get(lb.admin + "/status.html") as r:
                page = await r.text()
            assert "<html" in page and 'fetch("status")' in page


async def test_sighup_reload_changes_servers_without_dropping_a_connection(tmp_path: Path) -> None:
    ports = free_ports(4)
    a, b = Upstream("a", ports[2], tmp_path / "a.log"), Upstream("b", ports[3], tmp_path / "b.log")
    lb = Lb(ports[0], ports[1], tmp_path / "lb.toml", tmp_path / "lb.log")
    weighted = 'method = "round_robin"\n' + FAST_CHECKS  # its weights give an exact share
    write_config(lb.config, lb.port, lb.admin_port, [a], weighted)
    try:
        a.start()
        b.start()
        lb.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(get("/"))
        assert (await read_response(reader)).header("X-Upstream") is None or True

        write_config(lb.config, lb.port, lb.admin_port, [a, (b, "weight = 3")], weighted)
        lb.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        seen: Counter[str] = Counter()
        for _ in range(40):  # the same keep-alive connection goes on through the reload
            writer.write(get("/"))
            seen[(await read_response(reader)).header("X-Upstream") or "-"] += 1
        assert seen == {"a": 10, "b": 30}

        write_config(lb.config, lb.port, lb.admin_port, [b], weighted)
        lb.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        writer.write(get("/"))
        assert (await read_response(reader)).header("X-Upstream") == "b"
        assert [s["name"] for s in lb.status()["pools"]["http"]] == ["b"]

        lb.config.write_text("this is [not toml")
        lb.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        writer.write(get("/"))
        assert (await read_response(reader)).header("X-Upstream") == "b"
        assert "reload refused, the running configuration stays" in lb.log_text()
        writer.close()
    finally:
        lb.stop()
        a.kill()
        b.kill()


async def test_sigterm_finishes_in_flight_then_exits_0(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, _):
        assert lb.proc is not None
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", lb.port)
        async with aiohttp.ClientSession() as http:
            slow = asyncio.create_task(http.get(lb.url + "/slow?s=1"))
            await _busy_server(lb)
            lb.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            assert await closed_by_peer(idle_reader, timeout=2)  # idle keep-alive: closed at once
            try:
                await asyncio.open_connection("127.0.0.1", lb.port)
                refused = False
            except OSError:
                refused = True
            assert refused
            response = await slow
            assert response.status == 200
        idle_writer.close()
        assert await asyncio.to_thread(lb.proc.wait, 10) == 0


def run_lb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lb", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_check_config(tmp_path: Path) -> None:
    shipped = REPO / "infra" / "balance" / "lb.toml"
    # as nginx -t, the check reads the https listener's certificates (tls/, beside
    # the file: `stack up` and compose's tls-init make them)
    result = run_lb("--config", str(shipped), "--check-config")
    assert result.returncode == 2 and "tls/site.pem" in result.stderr
    good = tmp_path / "lb.toml"
    shutil.copy(shipped, good)
    authority(tmp_path / "tls").issue(tmp_path / "tls", "site", ["localhost"])
    result = run_lb("--config", str(good), "--check-config")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[server]]\naddress = "127.0.0.1:1"\n[health]\nintervall = "1s"\n')
    result = run_lb("--config", str(bad), "--check-config")
    assert result.returncode == 2
    assert f"{bad}:3: [health] intervall: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_lb("--config", str(good), "--listen", "127.0.0.1:1234", "--check-config")
    assert "listen 127.0.0.1:1234" in result.stdout  # flags override the file
    result = run_lb("--listen", "127.0.0.1:1", "--check-config")
    assert result.returncode == 2 and "no servers" in result.stderr


async def test_quick_flags_and_access_log(tmp_path: Path) -> None:
    port, admin, up_port = free_ports(3)
    upstream = Upstream("solo", up_port, tmp_path / "solo.log")
    upstream.start()
    log = tmp_path / "lb.log"
    proc = spawn_lb(
        [
            "--listen",
            f"127.0.0.1:{port}",
            "--server",
            upstream.address,
            "--admin",
            f"127.0.0.1:{admin}",
            "--health-path",
            "/health",
            "--access-log",
        ],
        log,
    )
    try:
        wait_port(port, proc)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/echo/logged") as r,
        ):
            assert r.status == 200
        await asyncio.sleep(0.2)
        assert '"GET /echo/logged HTTP/1.1" 200' in log.read_text()
    finally:
        stop(proc)
        upstream.kill()


async def test_client_connection_limit(tmp_path: Path) -> None:
    settings = FAST_CHECKS + "\n[limits]\nmax_client_connections = 2\n"
    with lb_with(tmp_path, settings=settings) as (lb, _):
        held = [await asyncio.open_connection("127.0.0.1", lb.port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await closed_by_peer(reader, timeout=3)
        for r, w in held:  # the two within the limit are served
            w.write(get("/"))
            assert (await read_response(r)).status == 200
            w.close()
        writer.close()
        assert time.monotonic()
