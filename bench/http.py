"""`python -m bench http`: lb against nginx and HAProxy, in front of the same upstreams, in one run.

Each proxy runs pinned with the two upstreams to one core and wrk to the
other, so every proxy gets the same machine. Rounds alternate between the
proxies and the median round counts, so a drift of the machine's speed hits all
of them alike. Every proxy does what it would do in production: lb with active
checks, its admin listener and X-Forwarded-For; nginx with upstream keep-alive
and X-Forwarded-For; HAProxy with checks, http-reuse always and forwardfor.
`bare-relay` is a reference point, not a contender: the least a uvloop +
httptools relay can do (see bench/bare_relay.py).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .idle import run_idle
from .idle import table as idle_table
from .procs import NGINX_HEAD, cpu_seconds, free_port, machine, require, rotated, running
from .wrk import WrkResult, run

PROXY_CORE, LOAD_CORE = 0, 1
PROXIES = ("nginx", "haproxy", "lb", "bare-relay")

NGINX_CONF = (
    NGINX_HEAD
    + """  upstream backends {{
    server 127.0.0.1:{up1} max_fails=1 fail_timeout=10s;
    server 127.0.0.1:{up2} max_fails=1 fail_timeout=10s;
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;  # as lb's (nginx's 511 drops 4,096 at once)
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""
)

HAPROXY_CFG = """
global
  nbthread {workers}
  maxconn 4096  # 10000 needs more file descriptors than this machine allows a process
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 75s
  option http-keep-alive
  http-reuse always
frontend web
  bind 127.0.0.1:{port}
  option forwardfor
  default_backend backends
backend backends
  balance roundrobin
  option httpchk GET /health
  server up1 127.0.0.1:{up1} check inter 1s rise 2 fall 2
  server up2 127.0.0.1:{up2} check inter 1s rise 2 fall 2
"""


@dataclass(frozen=True)
class Measure:
    proxy: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    errors: int


def proxy_argv(
    name: str,
    work: Path,
    port: int,
    up1: int,
    up2: int,
    workers: int = 1,
    admin: int | None = None,
) -> list[str]:
    """How each proxy is started; ``admin``: lb's admin port (default: any free one)."""
    if name == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(dir=work, name="nginx", port=port, up1=up1, up2=up2, workers=workers)
        )
        return ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")]
    if name == "haproxy":
        cfg = work / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, up1=up1, up2=up2, workers=workers))
        return ["haproxy", "-db", "-f", str(cfg)]
    if name == "lb":
        return [
            sys.executable,
            "-m",
            "lb",
            "--listen",
            f"127.0.0.1:{port}",
            "--server",
            f"up1=127.0.0.1:{up1}",
            "--server",
            f"up2=127.0.0.1:{up2}",
            "--admin",
            f"127.0.0.1:{admin or free_port()}",
            "--health-path",
            "/health",
            "--workers",
            str(workers),
        ]
    if name == "bare-relay":
        return [
            sys.executable,
            "-m",
            "bench.bare_relay",
            "--listen",
            str(port),
            "--upstream",
            str(up1),
            "--upstream",
            str(up2),
        ]
    raise ValueError(name)


def measure(
    name: str,
    work: Path,
    up1: int,
    up2: int,
    seconds: float,
    connections: int,
    workers: int = 1,
) -> Measure:
    """One proxy, one wrk run. One worker: the proxy (with the upstreams) on one
    core, wrk on the other. More: nothing pinned, wrk shares the cores."""
    port = free_port()
    argv = proxy_argv(name, work, port, up1, up2, workers)
    return measure_argv(name, argv, port, work, seconds, connections, workers)


def measure_argv(
    name: str,
    argv: list[str],
    port: int,
    work: Path,
    seconds: float,
    connections: int,
    workers: int = 1,
    path: str = "/",
    scheme: str = "http",
    headers: tuple[str, ...] = (),
) -> Measure:
    """``measure`` for a proxy started by ``argv``, listening on ``port``; wrk asks
    for ``path`` over ``scheme``, sending ``headers``."""
    proxy_core, load_core = (PROXY_CORE, LOAD_CORE) if workers == 1 else (None, None)
    with running(argv, core=proxy_core, port=port, log=work / f"{name}.log") as proc:
        url = f"{scheme}://127.0.0.1:{port}{path}"
        # warm up: pools, caches
        run(url, seconds=1, connections=connections, core=load_core, headers=headers)
        before = cpu_seconds(proc.pid)
        result: WrkResult = run(
            url, seconds=seconds, connections=connections, core=load_core, headers=headers
        )
        used = cpu_seconds(proc.pid) - before
    return Measure(
        proxy=name,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_request=used * 1e6 / max(result.requests, 1),
        errors=result.errors,
    )


@contextlib.contextmanager
def upstreams(
    work: Path, core: int | None = PROXY_CORE, size: int = 0
) -> Iterator[tuple[int, int]]:
    """Two bench.upstream processes; ``size``: their bodies' bytes (0: a greeting)."""
    ports = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports, 1):
            argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--name", f"up{i}"]
            argv += ["--size", str(size)] if size else []
            stack.enter_context(running(argv, core=core, port=port, log=work / f"up{i}.log"))
        yield ports


def run_http(
    *,
    seconds: float,
    connections: int,
    rounds: int,
    proxies: tuple[str, ...],
    say: Callable[[str], None],
    workers: int = 1,
) -> dict[str, Any]:
    require("wrk", "taskset", *(p for p in proxies if p in ("nginx", "haproxy")))
    rows: dict[str, list[Measure]] = {p: [] for p in proxies}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        with upstreams(work, PROXY_CORE if workers == 1 else None) as (up1, up2):
            for r in range(1, rounds + 1):
                for name in rotated(proxies, r):
                    say(
                        f"round {r}/{rounds}: {name} ({seconds:g}s, {connections} connections, "
                        f"{workers} worker(s))"
                    )
                    rows[name].append(measure(name, work, up1, up2, seconds, connections, workers))
    medians = {name: median(ms) for name, ms in rows.items()}
    base = medians.get("nginx")
    result: dict[str, Any] = {
        "benchmark": "http",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {
            "seconds": seconds,
            "connections": connections,
            "rounds": rounds,
            "workers": workers,
            "proxy_core": PROXY_CORE if workers == 1 else None,
            "load_core": LOAD_CORE if workers == 1 else None,
        },
        "proxies": {name: asdict(m) for name, m in medians.items()},
        "rounds": {name: [asdict(m) for m in ms] for name, ms in rows.items()},
    }
    if base is not None:
        result["ratios_to_nginx"] = {
            name: {
                "rps": round(m.rps / base.rps, 3),
                "p99": round(m.p99_ms / base.p99_ms, 3),
                "cpu_per_request": round(m.cpu_us_per_request / base.cpu_us_per_request, 3),
            }
            for name, m in medians.items()
        }
    return result


def median(ms: list[Measure]) -> Measure:
    by_rps = sorted(ms, key=lambda m: m.rps)
    return by_rps[len(by_rps) // 2]


def table(result: dict[str, Any]) -> str:
    ratios = result.get("ratios_to_nginx", {})
    lines = [
        "| proxy | req/s | p50 ms | p99 ms | CPU µs/req | errors | req/s vs nginx | p99 vs nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["proxies"].items():
        r = ratios.get(name, {})
        lines.append(
            f"| {name} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['cpu_us_per_request']:.1f} | {m['errors']} | {r.get('rps', float('nan')):.2f} | "
            f"{r.get('p99', float('nan')):.2f} |"
        )
    return "\n".join(lines)


# `python -m bench http`: one worker each at two sizes, then two workers each.
SIZES = (64, 4096)
TWO_WORKERS = ("nginx", "haproxy", "lb")


def run_http_suite(
    *, seconds: float, rounds: int, proxies: tuple[str, ...], say: Callable[[str], None]
) -> dict[str, Any]:
    """The measurement: each proxy in one worker (nginx worker_processes 1, HAProxy
    nbthread 1) at 64 and 4,096 keep-alive connections, pinned as above; then two
    workers each at 64 connections, nothing pinned (wrk shares the two cores)."""
    runs = [
        run_http(
            seconds=seconds, connections=size, rounds=rounds, proxies=proxies, say=say, workers=1
        )
        for size in SIZES
    ]
    two = tuple(p for p in proxies if p in TWO_WORKERS)
    if two:
        runs.append(
            run_http(
                seconds=seconds,
                connections=SIZES[0],
                rounds=rounds,
                proxies=two,
                say=say,
                workers=2,
            )
        )
    return {
        "benchmark": "http",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "runs": runs,
        "idle": measure_idle_connections(say),
    }


def measure_idle_connections(say: Callable[[str], None]) -> dict[str, Any]:
    """bench/idle.py: memory per idle keep-alive connection, one worker each."""
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        work = Path(tmp)
        with upstreams(work) as (up1, up2):

            def argv_of(name: str, port: int) -> list[str]:
                return proxy_argv(name, work, port, up1, up2)

            return run_idle(argv_of, free_port, PROXY_CORE, work, say)


def suite_table(result: dict[str, Any]) -> str:
    parts = []
    for run_result in result["runs"]:
        settings = run_result["settings"]
        workers = settings.get("workers", 1)
        where = "pinned: proxy and upstreams on one core, wrk on the other"
        if workers > 1:
            where = "nothing pinned: wrk shares the cores"
        parts.append(
            f"{settings['connections']} connections, {workers} worker(s) each ({where}):\n\n"
            + table(run_result)
        )
    if "idle" in result:
        idle = idle_table(result["idle"])
        parts.append(f"Idle keep-alive connections (bench/idle.py):\n\n{idle}")
    return "\n\n".join(parts)
