"""Processes the benchmarks start: pinned to a core, stopped by PID, CPU read from /proc."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from stack import processes

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


# The start of every nginx.conf a bench writes (a str.format template, as the
# rest of each file): in the foreground, its files under {dir}, no access log;
# the caller's part goes on inside `http {`, and closes it.
NGINX_HEAD = """
worker_processes {workers};
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
events {{ worker_connections 10240; }}  # bench/idle.py holds 8,200 clients
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
"""


def machine() -> dict[str, object]:
    """What every result records of where it ran: the cores, and the interpreter
    the Python processes ran on (its build moves their CPU per request)."""
    return {
        "cores": os.cpu_count() or 0,
        "python": f"{platform.python_version()} {os.path.realpath(sys.executable)}",
    }


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise BenchError(
            f"missing: {', '.join(missing)}; `make setup` installs them "
            "(apt-get install wrk nginx-light haproxy)"
        )


def rotated(items: tuple[str, ...], round_number: int) -> tuple[str, ...]:
    """Each round starts with another contender, so none always runs first or last."""
    k = (round_number - 1) % len(items)
    return items[k:] + items[:k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout:.0f}s")


def stolen_seconds(cores: Sequence[int], stat: str | None = None) -> list[float]:
    """Time the hypervisor ran something else on each of these cores (/proc/stat's
    steal column): a slower spell of a virtual machine that no process of ours shows."""
    stolen = dict.fromkeys(cores, 0.0)
    text = Path("/proc/stat").read_text() if stat is None else stat
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name[3:].isdigit() and name.startswith("cpu") and int(name[3:]) in stolen:
            stolen[int(name[3:])] = int(rest.split()[7]) / CLOCK_TICKS
    return [stolen[c] for c in cores]


def tree_sum(pid: int, of: Callable[[int], int]) -> int:
    """``of(p)`` summed over the process and all its descendants (nginx's
    workers); a process gone meanwhile counts nothing."""
    ref = processes.ref_of(pid)
    if ref is None:
        return 0
    total = 0
    for p in processes.tree(ref):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += of(p)
    return total


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and all its descendants."""
    return tree_sum(pid, _cpu_ticks) / CLOCK_TICKS


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    core: int | None,
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` (on ``core`` when given), wait for ``port``, always stop it by PID."""
    command = (["taskset", "-c", str(core)] if core is not None else []) + list(argv)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ref = processes.ref_of(proc.pid)
                if ref is not None:
                    processes.kill_tree(ref)
                proc.wait(timeout=5)
