"""Driving a real stack through its CLI from tests, on free ports, always cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from stack import processes
from stack.processes import ProcessRef
from stack.topology import Ports

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now, all different."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run_stack(
    args: Sequence[str], *, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "stack", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"`python -m stack {' '.join(args)}` exited {result.returncode}\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class StackHandle:
    state_dir: Path
    ports: Ports

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return run_stack([command, "--state-dir", str(self.state_dir), *rest], check=check)

    def backend_url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports.backend(index)}"

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def refs(self) -> dict[str, ProcessRef]:
        return {k: ProcessRef.from_json(v) for k, v in self.state()["processes"].items()}

    def kill(self, name: str) -> None:
        self.cli("kill", name)

    def start(self, name: str) -> None:
        self.cli("start", name)


def port_args(ports: Ports) -> list[str]:
    args = []
    for key in Ports.names():
        args += ["--port", f"{key}={getattr(ports, key.replace('-', '_'))}"]
    return args


def random_ports() -> Ports:
    return Ports(*free_ports(len(Ports.names())))


@contextlib.contextmanager
def running_stack(
    state_dir: Path, *, users: int, extra: Sequence[str] = ()
) -> Iterator[StackHandle]:
    ports = random_ports()
    handle = StackHandle(state_dir, ports)
    try:
        handle.cli("up", "--users", str(users), *port_args(ports), *extra)
        yield handle
    finally:
        started = _recorded(state_dir)
        run_stack(["down", "--state-dir", str(state_dir), "--purge"], check=False)
        # Whatever `down` could not stop (it failed, or the test broke the state
        # file) is killed here by PID, so no test leaves a process behind.
        for ref in started:
            processes.kill_tree(ref)


def profile_stack(profile: str, name: str | None = None) -> object:
    """A module-scoped fixture, named ``name`` (default ``<profile>_stack``): a small
    stack with this profile's proxies, started once for the module's tests and
    always taken down."""

    @pytest.fixture(scope="module", name=name or f"{profile}_stack")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
        with running_stack(
            tmp_path_factory.mktemp(profile), users=2000, extra=["--proxies", profile]
        ) as handle:
            yield handle

    return fixture


def _recorded(state_dir: Path) -> list[ProcessRef]:
    try:
        data = json.loads((state_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [ProcessRef.from_json(v) for v in data.get("processes", {}).values()]


async def scrape(*ports: int) -> set[str]:
    """Names of the metrics served at /metrics on these local ports."""
    names: set[str] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200, port
                for line in (await r.text()).splitlines():
                    if line and not line.startswith("#"):
                        names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


async def prometheus_scrapes(port: int, counter: str, within: float = 30.0) -> dict[str, str]:
    """Wait until the Prometheus on ``port`` has every target up and ``counter``
    has a series; the targets' health by job."""
    base = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            async with http.get(base + "/targets") as r:
                targets = (await r.json())["data"]["activeTargets"]
            async with http.get(base + "/query", params={"query": counter}) as r:
                series = (await r.json())["data"]["result"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            if targets and set(health.values()) == {"up"} and series:
                return health
            assert time.monotonic() < deadline, (health, counter, series)
            await asyncio.sleep(1)


async def hello_instances(http: aiohttp.ClientSession, entry: str, name: str) -> set[str]:
    """The second service through the entry proxy's route (/hello/): the
    instances that answered four requests, each greeting ``name``."""
    instances = set()
    for _ in range(4):
        async with http.get(f"{entry}/hello/{name}") as r:
            assert r.status == 200 and (await r.json())["hello"] == name
            instances.add(r.headers["X-Instance"])
    return instances
