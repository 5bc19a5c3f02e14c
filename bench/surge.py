"""`python -m bench surge`: a connection surge, lb against nginx and HAProxy in one run.

wrk opens 4,096 keep-alive connections at once and keeps them busy for
``seconds``, through each proxy to two upstreams that cost next to nothing
(nginx answering `return 200`, one worker each), ``runs`` times per proxy. A
balancer must absorb that: what counts is the answers that were not 2xx, wrk's
socket errors, and whether the proxy took a healthy upstream out (lb: its log;
nginx and HAProxy do not say, their answers do). Each proxy as `bench http`
runs it, lb with its defaults (queue.max_conns 64 per server).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .http import LOAD_CORE, PROXY_CORE, proxy_argv
from .procs import NGINX_HEAD, free_port, machine, require, running
from .wrk import run

PROXIES = ("lb", "nginx", "haproxy")
CONNECTIONS = 4096

NGINX_UPSTREAM = (
    NGINX_HEAD
    + """  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""
)


@contextlib.contextmanager
def nginx_upstreams(work: Path, count: int = 2) -> Iterator[tuple[int, ...]]:
    """``count`` nginx processes answering every request `return 200`, on one core."""
    ports = tuple(free_port() for _ in range(count))
    with contextlib.ExitStack() as stack:
        for port in ports:
            conf = work / f"upstream-{port}.conf"
            conf.write_text(
                NGINX_UPSTREAM.format(dir=work, name=f"upstream-{port}", port=port, workers=1)
            )
            argv = ["nginx", "-c", str(conf), "-p", str(work)]
            stack.enter_context(
                running(argv, core=PROXY_CORE, port=port, log=work / f"upstream-{port}.log")
            )
        yield ports


@dataclass(frozen=True)
class Surge:
    proxy: str
    run: int
    requests: int
    rps: float
    failed: int  # non-2xx answers and socket errors (connect, read, write, timeout)
    p99_ms: float
    marked_down: int | None  # upstreams the proxy took out (lb only)


def _surge(name: str, work: Path, ups: tuple[int, ...], seconds: float, runs: int) -> list[Surge]:
    port = free_port()
    log = work / f"{name}.log"
    out = []
    with running(proxy_argv(name, work, port, *ups), core=PROXY_CORE, port=port, log=log):
        time.sleep(1.5)  # the first checks have seen both upstreams up
        for n in range(1, runs + 1):
            r = run(
                f"http://127.0.0.1:{port}/",
                seconds=seconds,
                connections=CONNECTIONS,
                core=LOAD_CORE,
                timeout=10,
            )
            down = log.read_text(errors="replace").count("is now DOWN") if name == "lb" else None
            out.append(Surge(name, n, r.requests, r.rps, r.errors, r.p99_ms, down))
    return out


def run_surge(
    *,
    seconds: float = 6.0,
    runs: int = 5,
    proxies: tuple[str, ...] = PROXIES,
    say: Callable[[str], None],
) -> dict[str, Any]:
    require("wrk", "taskset", "nginx", *(p for p in proxies if p == "haproxy"))
    rows: list[Surge] = []
    with tempfile.TemporaryDirectory(prefix="bench-surge-") as tmp:
        work = Path(tmp)
        for name in proxies:
            say(f"{name}: {runs} runs of {seconds:g}s, {CONNECTIONS} connections")
            with nginx_upstreams(work) as ups:
                rows += _surge(name, work, ups, seconds, runs)
    return {
        "benchmark": "surge",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {"seconds": seconds, "runs": runs, "connections": CONNECTIONS},
        "runs": [asdict(r) for r in rows],
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| proxy | run | requests | req/s | failed | p99 ms | upstreams marked down |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        down = "—" if r["marked_down"] is None else str(r["marked_down"])
        lines.append(
            f"| {r['proxy']} | {r['run']} | {r['requests']:,} | {r['rps']:,.0f} | "
            f"{r['failed']} | {r['p99_ms']:.0f} | {down} |"
        )
    return "\n".join(lines)
