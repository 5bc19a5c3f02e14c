"""Real lb and upstream processes for tests, on free ports, stopped by PID whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stack import processes
from tests.stackctl import REPO, free_ports


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and anything it started (by PID, never by name)."""
    if proc.poll() is None:
        ref = processes.ref_of(proc.pid)
        if ref is not None:
            processes.kill_tree(ref)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass
class Upstream:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    tls: tuple[str, str] | None = None  # (certificate, key): it serves HTTPS

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        tls = ["--tls", *self.tls] if self.tls else []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "tests.upstream", "--port", str(self.port), "--name", self.name),
                *tls,
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Lb:
    port: int
    admin_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lb", "--config", str(self.config), *self.extra_args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        wait_port(self.port, self.proc)
        wait_port(self.admin_port, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict:
        import json

        with urllib.request.urlopen(self.admin + "/status", timeout=5) as r:
            return json.loads(r.read())

    def server_status(self, name: str) -> dict:
        return next(s for s in self.status()["pools"]["http"] if s["name"] == name)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def spawn_lb(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lb", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def write_config(
    path: Path,
    port: int,
    admin_port: int,
    servers: Sequence[Upstream | tuple[Upstream, str]],
    settings: str = "",
) -> None:
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'admin = "127.0.0.1:{admin_port}"',
        settings.strip(),
        "",
    ]
    for entry in servers:
        upstream, extra = entry if isinstance(entry, tuple) else (entry, "")
        lines += [
            "[[server]]",
            f'name = "{upstream.name}"',
            f'address = "{upstream.address}"',
            extra,
            "",
        ]
    path.write_text("\n".join(lines))


# Fast checks so tests about health run in seconds; documented defaults are 1s/500ms.
FAST_CHECKS = """
[health]
interval = "200ms"
timeout = "200ms"
rise = 2
fall = 2
"""


@contextlib.contextmanager
def lb_with(
    tmp: Path,
    names: Sequence[str] = ("a", "b"),
    settings: str = FAST_CHECKS,
    server_extra: dict[str, str] | None = None,
) -> Iterator[tuple[Lb, dict[str, Upstream]]]:
    ports = free_ports(len(names) + 2)
    upstreams = {
        n: Upstream(n, p, tmp / f"upstream-{n}.log") for n, p in zip(names, ports[2:], strict=True)
    }
    lb = Lb(ports[0], ports[1], tmp / "lb.toml", tmp / "lb.log")
    extra = server_extra or {}
    write_config(
        lb.config,
        lb.port,
        lb.admin_port,
        [(u, extra.get(n, "")) for n, u in upstreams.items()],
        settings,
    )
    try:
        for upstream in upstreams.values():
            upstream.start()
        lb.start()
        yield lb, upstreams
    finally:
        lb.stop()
        for upstream in upstreams.values():
            if upstream.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(upstream.proc.pid, signal.SIGCONT)
            upstream.kill()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def lb_in_front_of(backend: Handler, tmp: Path) -> AsyncIterator[Lb]:
    """An lb (its one upstream ``backend``, an asyncio server in the test's own
    loop, so the test sees every byte it gets and writes every byte it sends),
    started, then stopped and the server closed whatever happens."""
    port, lb_port, admin_port = free_ports(3)
    server = await asyncio.start_server(backend, "127.0.0.1", port)
    lb = Lb(lb_port, admin_port, tmp / "lb.toml", tmp / "lb.log")
    write_config(lb.config, lb.port, lb.admin_port, [Upstream("a", port, tmp / "a.log")])
    try:
        await asyncio.to_thread(lb.start)
        yield lb
    finally:
        lb.stop()
        server.close()
        await server.wait_closed()
