"""`python -m bench gray`: a frozen upstream under keep-alive load, lb against
nginx and HAProxy in one run.

Two upstreams (bench/upstream.py), each proxy as `bench http` runs it, 16
keep-alive wrk connections for ``seconds``; ``freeze_at`` seconds in, one
upstream is stopped with SIGSTOP for ``freeze_for`` seconds (a stop-the-world
pause, a hung process, `docker pause`), then continued. What counts: the
requests that failed (non-2xx, or no answer within wrk's 30 s timeout) and the
slowest one. The proxies run in turn over the same upstreams; the upstream is
continued and given a second before the next proxy starts.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .http import LOAD_CORE, PROXY_CORE, proxy_argv
from .procs import free_port, machine, require, running
from .wrk import run

PROXIES = ("lb", "nginx", "haproxy")
CONNECTIONS = 16


@dataclass(frozen=True)
class Frozen:
    proxy: str
    requests: int
    failed: int
    p99_ms: float
    max_ms: float


def measure(
    name: str,
    work: Path,
    ports: tuple[int, int],
    frozen_pid: int,
    *,
    seconds: float,
    freeze_at: float,
    freeze_for: float,
) -> Frozen:
    port = free_port()
    argv = proxy_argv(name, work, port, *ports)
    with running(argv, core=PROXY_CORE, port=port, log=work / f"{name}.log"):
        url = f"http://127.0.0.1:{port}/"
        # warm: pools filled, and the first checks have seen both upstreams up
        run(url, seconds=2, connections=CONNECTIONS, core=LOAD_CORE)
        freeze = threading.Timer(freeze_at, os.kill, (frozen_pid, signal.SIGSTOP))
        thaw = threading.Timer(freeze_at + freeze_for, os.kill, (frozen_pid, signal.SIGCONT))
        freeze.start()
        thaw.start()
        try:
            result = run(url, seconds=seconds, connections=CONNECTIONS, core=LOAD_CORE, timeout=30)
        finally:
            freeze.cancel()
            thaw.cancel()
            os.kill(frozen_pid, signal.SIGCONT)
    time.sleep(1.0)  # the continued upstream works off what it was sent meanwhile
    return Frozen(name, result.requests, result.errors, result.p99_ms, result.max_ms)


def run_gray(
    *,
    seconds: float = 12.0,
    freeze_at: float = 3.0,
    freeze_for: float = 6.0,
    proxies: tuple[str, ...] = PROXIES,
    say: Callable[[str], None],
) -> dict[str, Any]:
    require("wrk", "taskset", *(p for p in proxies if p in ("nginx", "haproxy")))
    rows: list[Frozen] = []
    with tempfile.TemporaryDirectory(prefix="bench-gray-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        ports = free_port(), free_port()
        procs = [
            stack.enter_context(
                running(
                    [sys.executable, "-m", "bench.upstream", "--port", str(p), "--name", f"up{i}"],
                    core=PROXY_CORE,
                    port=p,
                    log=work / f"up{i}.log",
                )
            )
            for i, p in enumerate(ports, 1)
        ]
        for name in proxies:
            say(f"{name}: {seconds:g}s, {CONNECTIONS} connections, up1 frozen at {freeze_at:g}s")
            rows.append(
                measure(
                    name,
                    work,
                    ports,
                    procs[0].pid,
                    seconds=seconds,
                    freeze_at=freeze_at,
                    freeze_for=freeze_for,
                )
            )
    return {
        "benchmark": "gray",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {
            "seconds": seconds,
            "connections": CONNECTIONS,
            "freeze_at": freeze_at,
            "freeze_for": freeze_for,
        },
        "proxies": {r.proxy: asdict(r) for r in rows},
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| proxy | requests | failed | p99 ms | slowest ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["proxies"].items():
        lines.append(
            f"| {name} | {r['requests']:,} | {r['failed']} | {r['p99_ms']:.1f} | "
            f"{r['max_ms']:.0f} |"
        )
    return "\n".join(lines)
