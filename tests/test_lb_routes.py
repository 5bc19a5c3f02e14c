"""Routes to pools on real processes: one lb with two pools (users: a, b; static:
s) and routes of every kind, its JSON access log telling which route each
request took (by its X-Request-ID); then pools with their own health, a reload
of routes under load, a rate limit across two workers, and the access log's
combined format reopened on SIGUSR1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.ratelimit import shared_path
from tests.lbctl import Lb, Upstream
from tests.lbload import keepalive_clients
from tests.rawhttp import Response, send
from tests.stackctl import REPO, free_ports

HEALTH = """
[health]
interval = "200ms"
timeout = "200ms"
rise = 2
fall = 2
"""

POOLS = """
[[pool]]
name = "users"
[[pool.server]]
name = "a"
address = "127.0.0.1:{a}"
[[pool.server]]
name = "b"
address = "127.0.0.1:{b}"

[[pool]]
name = "static"
[[pool.server]]
name = "s"
address = "127.0.0.1:{s}"
"""

ROUTES = r"""
[[route]]
name = "exact"
path = "/echo/exact"
pool = "static"

[[route]]
name = "images"
path_prefix_first = "/echo/images/"
pool = "static"

[[route]]
name = "json"
path_regex = "\\.json$"
pool = "static"

[[route]]
name = "deletes"
path_prefix = "/echo/users/"
methods = ["DELETE"]
pool = "static"

[[route]]
name = "users"
path_prefix = "/echo/users/"
pool = "users"

[[route]]
name = "admin"
path_prefix = "/echo/admin/"
return = 403
body = "not here\n"

[[route]]
name = "admin-host"
host = "admin.test"
pool = "static"

[[route]]
name = "wild"
host = "*.static.test"
pool = "static"

[[route]]
name = "canary"
headers = { X-Canary = "1" }
pool = "static"

[[route]]
name = "old"
host = "old.test"
return = 301
location = "https://new.test$request_uri"

[[route]]
name = "slow"
path_prefix = "/slow"
pool = "users"
tries = 1
hedge_after = "off"
[route.timeouts]
first_byte = "300ms"

[[route]]
name = "small"
path_prefix = "/upload"
pool = "users"
max_body_bytes = "1k"

[[route]]
name = "default"
host = ["127.0.0.1", "users.test"]
pool = "users"
"""


@dataclass
class Routed:
    lb: Lb
    upstreams: dict[str, Upstream]
    access: Path

    def ask(
        self,
        path: str,
        host: str = "users.test",
        method: str = "GET",
        headers: str = "",
        body: bytes = b"",
    ) -> Response:
        length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}{headers}\r\n"
        return asyncio.run(send(self.lb.port, head.encode() + body))[0]

    def route_of(self, response: Response) -> dict[str, object]:
        """The access log's line for ``response`` (the log is flushed within 1 s)."""
        rid = response.header("x-request-id")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.access.exists():
                for line in self.access.read_text().splitlines():
                    entry = json.loads(line)
                    if entry["request_id"] == rid:
                        return entry
            time.sleep(0.1)
        raise AssertionError(f"no access log line for {rid}")


def start_upstreams(tmp: Path, names: list[str]) -> dict[str, Upstream]:
    ports = free_ports(len(names))
    ups = {n: Upstream(n, p, tmp / f"upstream-{n}.log") for n, p in zip(names, ports, strict=True)}
    for u in ups.values():
        u.start()
    return ups


@contextlib.contextmanager
def running(tmp: Path, text: str, upstreams: dict[str, Upstream]) -> Iterator[Lb]:
    port, admin = free_ports(2)
    lb = Lb(port, admin, tmp / "lb.toml", tmp / "lb.log")
    lb.config.write_text(f'listen = "127.0.0.1:{port}"\nadmin = "127.0.0.1:{admin}"\n' + text)
    try:
        lb.start()
        yield lb
    finally:
        lb.stop()
        for u in upstreams.values():
            u.kill()


@contextlib.contextmanager
def removed_after(lb: Lb) -> Iterator[None]:
    """The limits' files of ``lb``'s supervisor, removed once it is stopped (a
    SIGKILL skips its own clean-up)."""
    try:
        yield
    finally:
        lb.stop()
        assert lb.proc is not None
        for route in ("limited", "free"):
            shared_path(lb.proc.pid, route).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    tmp = tmp_path_factory.mktemp("routes")
    ups = start_upstreams(tmp, ["a", "b", "s"])
    access = tmp / "access.log"
    pools = POOLS.format(a=ups["a"].port, b=ups["b"].port, s=ups["s"].port)
    head = f'access_log = "{access}"\naccess_log_format = "json"\n'
    with running(tmp, head + HEALTH + pools + ROUTES, ups) as lb:
        yield Routed(lb, ups, access)


@pytest.mark.parametrize(
    ("path", "route", "pool"),
    [
        ("/echo/exact", "exact", "static"),  # exact, before every prefix
        ("/echo/exact/more", "default", "users"),  # exact is exact
        ("/echo/images/a.json", "images", "static"),  # ^~ stops the regexes
        ("/echo/users/a.json", "json", "static"),  # a regex beats a prefix
        ("/echo/users/1", "users", "users"),  # the longest prefix
        ("/echo/other", "default", "users"),  # the host's catch-all
    ],
)
def test_paths_choose_as_nginx_locations_do(
    routed: Routed, path: str, route: str, pool: str
) -> None:
    r = routed.ask(path)
    assert r.status == 200
    assert r.header("x-upstream") in (("s",) if pool == "static" else ("a", "b"))
    entry = routed.route_of(r)
    assert (entry["route"], entry["pool"]) == (route, pool)


def test_hosts_methods_and_headers(routed: Routed) -> None:
    def route(path: str = "/echo/x", **kw: str) -> object:
        r = routed.ask(path, **kw)
        assert r.status == 200, (kw, r.status)
        return routed.route_of(r)["route"]

    assert route(host="admin.test") == "admin-host"
    assert route(host="ADMIN.test:8080") == "admin-host"
    assert route(host="img.static.test") == "wild"
    # a route without a host is one of every host's: its longer prefix wins
    assert route("/echo/users/x", host="admin.test") == "users"
    assert route("/echo/users/x", method="DELETE") == "deletes"
    assert route("/echo/users/x", method="GET") == "users"
    assert route(headers="X-Canary: 1\r\n", host="nobody.test") == "canary"
    # no route for that host: a 404 with a JSON body, from lb
    r = routed.ask("/echo/x", host="nobody.test")
    assert r.status == 404 and json.loads(r.body)["code"] == "no_route"
    assert routed.route_of(r)["pool"] == "-"


def test_fixed_answers_and_redirects(routed: Routed) -> None:
    r = routed.ask("/a/b?c=1", host="old.test:8080")
    assert r.status == 301 and r.header("location") == "https://new.test/a/b?c=1"
    r = routed.ask("/echo/admin/secrets")
    assert r.status == 403 and r.body == b"not here\n"


@pytest.mark.parametrize(
    "path",
    [
        "/echo/users/../admin/secrets",
        "/echo/users/%2e%2e/admin/secrets",
        "/echo/users/%2E%2E%2Fadmin/secrets",
        "//echo//admin/secrets",
        "/echo/./admin/secrets",
    ],
)
def test_no_encoded_traversal_leads_around_a_route(routed: Routed, path: str) -> None:
    r = routed.ask(path)
    assert r.status == 403 and r.body == b"not here\n", (path, r.status)


def test_a_path_above_the_root_is_a_400(routed: Routed) -> None:
    r = routed.ask("/echo/%2e%2e/%2e%2e/etc/passwd")
    assert r.status == 400 and "code" in json.loads(r.body)


def test_per_route_timeouts_tries_and_body_limit(routed: Routed) -> None:
    started = time.monotonic()
    r = routed.ask("/slow?s=3")
    assert r.status == 504  # the route's first_byte, not the pool's (60 s)
    assert time.monotonic() - started < 2.5
    entry = routed.route_of(r)
    assert (entry["route"], entry["tries"]) == ("slow", 1)
    assert routed.ask("/echo/users/slow-is-elsewhere").status == 200
    assert routed.ask("/upload", method="POST", body=b"x" * 2048).status == 413
    r = routed.ask("/echo/users/big", method="POST", body=b"x" * 2048)
    assert r.status == 200 and json.loads(r.body)["body_length"] == 2048


def test_the_access_log_in_json(routed: Routed) -> None:
    r = routed.ask("/echo/users/logged", headers="User-Agent: probe/1\r\nReferer: http://r/\r\n")
    entry = routed.route_of(r)
    assert entry["method"] == "GET" and entry["target"] == "/echo/users/logged"
    assert entry["status"] == 200 and entry["body_bytes_sent"] == len(r.body)
    assert (entry["user_agent"], entry["referer"]) == ("probe/1", "http://r/")
    assert entry["server"] in ("a", "b") and entry["tries"] == 1 and entry["hedged"] is False
    assert 0 <= entry["upstream_connect_time"] <= entry["upstream_first_byte_time"]
    assert entry["upstream_first_byte_time"] <= entry["request_time"]


def test_two_pools_have_their_own_health(routed: Routed) -> None:
    """The static pool's only server dies: its routes answer 503 at once, the
    users pool serves on; it comes back and is found again."""
    s = routed.upstreams["s"]
    s.kill()
    try:
        deadline = time.monotonic() + 10
        while routed.lb.status()["pools"]["static"][0]["state"] != "DOWN":
            assert time.monotonic() < deadline, "s never marked down"
            time.sleep(0.1)
        r = routed.ask("/echo/exact")
        assert r.status == 503 and json.loads(r.body)["code"] == "no_server"
        for _ in range(10):
            assert routed.ask("/echo/users/1").status == 200
        assert all(x["state"] == "UP" for x in routed.lb.status()["pools"]["users"])
    finally:
        s.start()
    deadline = time.monotonic() + 10
    while routed.lb.status()["pools"]["static"][0]["state"] != "UP":
        assert time.monotonic() < deadline, "s never came back"
        time.sleep(0.1)
    assert routed.ask("/echo/exact").status == 200


def test_metrics_and_status_by_pool_and_route(routed: Routed) -> None:
    import urllib.request

    routed.ask("/echo/exact")
    with urllib.request.urlopen(routed.lb.admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert re.search(
        r'^lb_route_responses_total\{class="2xx",pool="static",route="exact"\} [1-9]', text, re.M
    )
    assert 'lb_server_up{pool="static",server="s",state="UP"} 1.0' in text
    assert 'lb_request_duration_seconds_count{pool="users"}' in text
    status = routed.lb.status()
    assert status["routes"]["old"]["answer"] == 301 and status["routes"]["users"]["pool"] == "users"
    assert set(status["pools"]) == {"users", "static"}


def test_admin_api_by_pool(routed: Routed) -> None:
    import urllib.error
    import urllib.request

    def post(path: str) -> dict[str, object]:
        request = urllib.request.Request(routed.lb.admin + path, method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    assert post("/pools/users/servers/a/disable")["state"] == "MAINT"
    try:
        assert {routed.ask("/echo/users/x").header("x-upstream") for _ in range(6)} == {"b"}
    finally:
        assert post("/pools/users/servers/a/enable")["state"] == "UP"
    with pytest.raises(urllib.error.HTTPError) as info:
        post("/pools/static/servers/a/disable")  # a is not a server of static
    assert info.value.code == 404


def test_check_config_names_the_line_of_a_bad_route(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = (
        POOLS.format(a=1, b=2, s=3)
        + '[[route]]\npool = "users"\n\n[[route]]\npath_regex = "(x"\npool = "users"\n'
    )
    bad.write_text(text)
    line = text.splitlines().index('path_regex = "(x"')  # the line of its [[route]]
    result = subprocess.run(
        [sys.executable, "-m", "lb", "--config", str(bad), "--check-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{bad}:{line}: [route[1]] path_regex: not a regular expression" in result.stderr


# -- reload, limits across workers, the combined log ------------------------------------
def test_reload_of_routes_and_pools_under_load_loses_nothing(tmp_path: Path) -> None:
    ups = start_upstreams(tmp_path, ["a", "b", "s"])
    pools = POOLS.format(a=ups["a"].port, b=ups["b"].port, s=ups["s"].port)
    users_only = pools[: pools.index("[[pool]]", 10)]  # the reload adds the static pool
    before = users_only + '[[route]]\nname = "all"\npool = "users"\n'
    after = (
        pools
        + '[[route]]\nname = "moved"\npath_prefix = "/echo/moved"\npool = "static"\n'
        + '[[route]]\nname = "all"\npool = "users"\n'
        + '[route.limit]\nrate = "10000r/s"\nburst = 10000\nnodelay = true\n'
    )
    with running(tmp_path, HEALTH + before, ups) as lb:

        async def load_and_reload() -> int:
            load = asyncio.create_task(keepalive_clients(lb.port, 8, 3.0, "/echo/x"))
            await asyncio.sleep(1.0)
            lb.config.write_text(lb.config.read_text().replace(before, after))
            lb.signal(signal.SIGHUP)
            result = await load
            assert len(result.statuses) > 100
            return result.failed

        assert asyncio.run(load_and_reload()) == 0
        deadline = time.monotonic() + 5
        while "moved" not in lb.status()["routes"] or "static" not in lb.status()["pools"]:
            assert time.monotonic() < deadline, "the reload did not take"
            time.sleep(0.1)
        r = asyncio.run(send(lb.port, b"GET /echo/moved HTTP/1.1\r\nHost: x\r\n\r\n"))[0]
        assert r.status == 200 and r.header("x-upstream") == "s"


def test_a_rate_limit_holds_across_two_workers(tmp_path: Path) -> None:
    """50 r/s, burst 10, nodelay: 8 connections spread over two workers ask as
    fast as they can for 4 s; what passes stays within 10% of 10 + 50 x 4, and
    the rest is answered 429 with Retry-After. The combined access log of both
    workers holds one whole line per request, and SIGUSR1 reopens it."""
    ups = start_upstreams(tmp_path, ["a", "b"])
    access = tmp_path / "access.log"
    text = (
        f'workers = 2\naccess_log = "{access}"\n'
        + HEALTH
        + f'[[server]]\nname = "a"\naddress = "{ups["a"].address}"\n'
        + f'[[server]]\nname = "b"\naddress = "{ups["b"].address}"\n'
        + '[[route]]\nname = "limited"\npath_prefix = "/echo/"\npool = "http"\n'
        + '[route.limit]\nrate = "50r/s"\nburst = 10\nnodelay = true\n'
        + '[[route]]\nname = "free"\npool = "http"\n'
    )
    with running(tmp_path, text, ups) as lb, removed_after(lb):
        seconds = 4.0
        load = asyncio.run(keepalive_clients(lb.port, 8, seconds, "/echo/limited"))
        passed = load.statuses.count(200)
        expected = 10 + 50 * seconds
        assert abs(passed - expected) <= 0.1 * expected, (passed, expected)
        assert set(load.statuses) == {200, 429}
        # 30 at once on one connection: past the burst, answered 429 with Retry-After
        burst = asyncio.run(send(lb.port, b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n" * 30, 30))
        refused = [r for r in burst if r.status == 429]
        assert refused and all(r.header("retry-after") == "1" for r in refused)
        assert json.loads(refused[0].body)["code"] == "rate_limited"
        assert len(lb.status()["workers"]) == 2
        route = lb.status()["routes"]["limited"]
        assert route["limited"] == load.statuses.count(429) + len(refused)
        # the other route has no limit
        assert asyncio.run(send(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))[0].status == 200

        # every request one whole line, whichever worker wrote it
        time.sleep(1.5)
        line = re.compile(
            r'^127\.0\.0\.1 - - \[[^]]+\] "GET /\S* HTTP/1\.1" (200|429) \d+ "-" "-" '
            r"\d+\.\d{3} rid=[0-9a-f]{32} route=(limited|free) pool=(http|-) server=\S+ tries=[01]$"
        )
        lines = access.read_text().splitlines()
        assert len(lines) == len(load.statuses) + len(burst) + 1
        assert all(line.match(x) for x in lines), next(x for x in lines if not line.match(x))

        rotated = tmp_path / "access.log.1"
        access.rename(rotated)
        lb.signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert (
            asyncio.run(send(lb.port, b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n"))[0].status
            == 200
        )
        deadline = time.monotonic() + 5
        while not (access.exists() and "GET /echo/after" in access.read_text()):
            assert time.monotonic() < deadline, "the log was not reopened"
            time.sleep(0.1)
        assert "GET /echo/after" not in rotated.read_text()
        assert len(rotated.read_text().splitlines()) == len(lines)
