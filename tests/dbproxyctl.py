"""A dbproxy process of a test's own, in front of a running stack's clusters."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.lbctl import stop, wait_port
from tests.stackctl import REPO, StackHandle, free_ports

FAST = """
[check]
interval = "200ms"
timeout = "1s"
rise = 2
fall = 2
"""


@dataclass
class DbProxyProc:
    ports: dict[str, int]
    admin_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/status", timeout=5) as r:
            return json.loads(r.read())

    def server(self, name: str) -> dict:
        return next(s for s in self.status()["pools"]["postgres"] if s["name"] == name)

    def admin(self, path: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_config(
    path: Path, stack: StackHandle, ports: dict[str, int], admin: int, extra: str, top: str = ""
) -> None:
    path.write_text(
        top
        + f'admin = "127.0.0.1:{admin}"\n'
        + "[listen]\n"
        + "".join(f'{role} = "127.0.0.1:{port}"\n' for role, port in ports.items())
        + extra
        + f'\n[[server]]\nname = "service-db"\naddress = "127.0.0.1:{stack.ports.master}"\n'
        + '\n[[server]]\nname = "service-db-replica"\n'
        + f'address = "127.0.0.1:{stack.ports.replica}"\n'
        + 'slot = "users_sub"\n'
    )


@contextlib.contextmanager
def dbproxy_for(
    stack: StackHandle, tmp: Path, extra: str = FAST, top: str = ""
) -> Iterator[DbProxyProc]:
    """``top``: top-level keys (before the first table); ``extra``: tables after [listen]."""
    rw, ro, any_, admin = free_ports(4)
    ports = {"rw": rw, "ro": ro, "any": any_}
    config, log = tmp / "dbproxy.toml", tmp / "dbproxy.log"
    write_config(config, stack, ports, admin, extra, top)
    env = dict(
        os.environ,
        DBPROXY_CHECK_PASSWORD=stack.state()["topology"]["credentials"]["check_password"],
    )
    proc = spawn(config, log, env)
    try:
        wait_port(admin, proc)
        yield DbProxyProc(ports, admin, config, log, proc)
    finally:
        stop(proc)


def spawn(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python -m dbproxy --config`` in a process group of its own, its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dbproxy", "--config", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def app_password(stack: StackHandle) -> str:
    return stack.state()["topology"]["credentials"]["app_password"]


async def connect(stack: StackHandle, port: int, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="users_app",
        password=app_password(stack),
        database="users",
        **kwargs,  # type: ignore[arg-type]
    )


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` holds to 127.0.0.1:``port``
    (read from /proc: the sockets among its fds, matched in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    remote = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == remote and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count
