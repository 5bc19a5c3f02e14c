"""docker-compose-balance.yml run for real, each profile in turn (stack/containers.py:
Docker where there is one, else podman with local stand-in images): every
service healthy; the API through :8080; the seed's drill on containers, as the
seed ran it (`stop` and `start` the replica's container, a backend's, then
`kill` the backend and start it) under steady reads, with every read answered
on the python profile and the classic profile's counts printed beside it;
Prometheus (the one in the stack) with every target up and the proxy's
counters growing; every query of the Grafana dashboard answered with data; and
nothing of the project left once it is down."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from bench.drill import READS, SEARCH_PREFIXES, Step, format_table, run_drill
from stack import containers
from stack.engine import (
    Engine,
    docker_engine,
    podman_engine,
    start_podman_service,
    stop_podman_service,
    why_no_engine,
)
from stack.topology import BACKENDS, REPLICA
from tests.stackctl import REPO

ENTRY = "http://127.0.0.1:8080"
PROMETHEUS = "http://127.0.0.1:9090"
COMPOSE_DRILL = pytest.StashKey[dict[str, Any]]()
# The seed's drill on containers, as its README ran it.
STEPS = (
    Step("all up"),
    Step("replica stopped", "stop", REPLICA),
    Step("replica started", "start", REPLICA),
    Step("backend stopped", "stop", BACKENDS[0]),
    Step("backend started", "start", BACKENDS[0]),
    Step("backend killed", "kill", BACKENDS[0]),
    Step("backend started again", "start", BACKENDS[0]),
)

pytestmark = pytest.mark.skipif((reason := why_no_engine()) is not None, reason=reason or "")


@dataclass
class Running:
    engine: Engine
    profile: str


@pytest.fixture(scope="module", params=containers.PROFILES)
def compose(request: pytest.FixtureRequest) -> Iterator[Running]:
    profile = request.param
    try:
        engine = containers.up(profile, say=print)
        yield Running(engine, profile)
    finally:
        containers.down(say=print)
    engine = docker_engine() or podman_engine()
    if engine.kind == "podman":
        start_podman_service(engine, lambda _: None)
        try:
            left = containers.leftovers(engine)
        finally:
            stop_podman_service()
    else:
        left = containers.leftovers(engine)
    assert not left, f"compose down left {left}"


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(expr: str) -> list[dict[str, Any]]:
    data = _get(f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    return data["data"]["result"]


async def _register(http: aiohttp.ClientSession, first: str, last: str, n: int) -> str:
    body = {
        "first_name": first + f"на{n}",
        "second_name": last + f"ова{n}",
        "birthdate": "1990-01-01",
        "password": f"compose-{n}",
    }
    async with http.post(ENTRY + "/user/register", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["user_id"]


async def test_every_service_healthy_and_the_api_through_the_entry(compose: Running) -> None:
    states = {
        s: containers.health(compose.engine, c)
        for s, c in containers.containers(compose.engine).items()
    }
    assert set(states) == set(containers.services(compose.engine, compose.profile))
    assert all(
        st in ("healthy", "none", "") or (s in containers.ONE_SHOT and st == "done")
        for s, st in states.items()
    ), states
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        user_id = await _register(http, "Анна", "Кузнецова", 0)
        body = {"id": user_id, "password": "compose-0"}
        async with http.post(ENTRY + "/login", json=body) as r:
            assert r.status == 200 and (await r.json())["token"]
        deadline = time.monotonic() + 10  # the replica applies the insert
        while True:
            async with http.get(f"{ENTRY}/user/get/{user_id}") as r:
                if r.status == 200:
                    assert (await r.json())["id"] == user_id
                    break
                assert r.status == 404 and time.monotonic() < deadline
            await asyncio.sleep(0.2)
        params = {"first_name": "Анна", "last_name": "Кузнецова"}
        async with http.get(ENTRY + "/user/search", params=params) as r:
            assert r.status == 200 and user_id in [u["id"] for u in await r.json()]
        # the entry over https (tls-init's certificate; its CA stays in the volume)
        unverified = ssl._create_unverified_context()
        async with http.get(f"https://127.0.0.1:8443/user/get/{user_id}", ssl=unverified) as r:
            assert r.status == 200
    if compose.profile == "python":
        # the backends' sessions (sslmode=prefer) came in over TLS dbproxy ended
        tls = _get("http://127.0.0.1:9102/status")["tls"]
        assert tls["handshakes"]["handshakes"] >= 2, tls


async def test_the_seeds_drill_on_containers(compose: Running, pytestconfig: pytest.Config) -> None:
    # Users for the drill's reads, on both databases before it starts.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for first, last in SEARCH_PREFIXES:
            for n in range(10):
                await _register(http, first, last, n)
        deadline = time.monotonic() + 15
        for first, last in SEARCH_PREFIXES:
            while True:
                params = {"first_name": first, "last_name": last}
                async with http.get(ENTRY + "/user/search", params=params) as r:
                    if r.status == 200 and len(await r.json()) >= 10:
                        break
                assert time.monotonic() < deadline, "the replica never had the drill's users"
                await asyncio.sleep(0.3)

    async def control(command: str, service: str) -> None:
        await asyncio.to_thread(compose.engine.compose, compose.profile, command, service)

    result = await run_drill(
        ENTRY, control, profile=compose.profile, rate=50.0, step_seconds=4.0, steps=STEPS
    )
    pytestconfig.stash.setdefault(COMPOSE_DRILL, {})[compose.profile] = result
    print(format_table({compose.profile: result}))
    if compose.profile == "python":
        for i, step in enumerate(STEPS):
            reads = result.counts(i, READS)
            assert set(reads) == {200}, f"{step.name}: reads {dict(reads)}"
            assert reads[200] > 50, f"{step.name}: too few reads to judge"


def test_prometheus_scrapes_every_target_and_the_proxy_counts(compose: Running) -> None:
    deadline = time.monotonic() + 30
    while True:
        targets = _get(f"{PROMETHEUS}/api/v1/targets")["data"]["activeTargets"]
        jobs = {t["labels"]["job"]: t["health"] for t in targets}
        if targets and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(1)
    expected = {"backends", "db-proxy"} | (
        {"http-proxy"} if compose.profile == "python" else {"nginx"}
    )
    assert set(jobs) == expected
    counter = "lb_responses_total" if compose.profile == "python" else "nginx_http_requests_total"

    def total() -> float:
        return sum(float(r["value"][1]) for r in _query(counter))

    before = total()
    for _ in range(20):
        urllib.request.urlopen(ENTRY + "/health", timeout=5).read()
    time.sleep(6)  # a scrape or more (every 5 s)
    assert total() > before


DASHBOARD = REPO / "infra/grafana/dashboards/balance.json"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_dashboard_query_returns_data(compose: Running) -> None:
    # The other profile's proxies' series are not there: nginx's and HAProxy's
    # panels are the classic profile's, lb's and dbproxy's the python one's.
    other = r"\b(nginx|haproxy)_" if compose.profile == "python" else r"\b(lb|dbproxy)_"
    mine = [q for q in dashboard_queries() if not re.search(other, q)]
    assert len(mine) >= 6
    deadline = time.monotonic() + 40  # rate() over [1m] needs two scrapes of each series
    while True:
        empty = [q for q in mine if not _query(q)]
        if not empty:
            return
        assert time.monotonic() < deadline, f"no data for {empty}"
        for _ in range(10):
            urllib.request.urlopen(ENTRY + "/health", timeout=5).read()
        time.sleep(2)


def compose_drill_summary(config: pytest.Config) -> str | None:
    results = config.stash.get(COMPOSE_DRILL, None)
    return format_table(results) if results else None
