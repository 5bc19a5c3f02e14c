"""`python -m bench gray`: gray failures and a crowd, lb against nginx and
HAProxy in one run, each proxy as `bench http` runs it (shipped defaults, two
upstreams of bench/upstream.py, pinned as there).

The scenarios:
- frozen: 16 keep-alive connections; 3 s in, one upstream is stopped with
  SIGSTOP for 6 s (a stop-the-world pause, a hung process, `docker pause`).
- both slow: every answer of both upstreams takes 400 ms (their health checks
  stay quick): hedging cannot help, and must not multiply the load.
- one slow: one upstream answers in 1.5 s, the other at once.
- failing fast: one upstream answers everything but its health check 503 in
  no time (a broken deploy whose /health still says OK).
- crowd: 4,096 keep-alive connections on fast upstreams, wrk's 2 s timeout.

What counts: requests answered and failed (non-2xx, or none within wrk's
timeout), the share answered 200, p50/p99/slowest, and the amplification:
requests the upstreams received (bench/upstream.py counts them) per request
wrk sent (a Lua script counts them, those still in flight at the end too). For
lb in the crowd: how long after the clients left its queue (lb_queue_length)
was empty again.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .http import LOAD_CORE, PROXY_CORE, proxy_argv
from .procs import free_port, machine, require, running
from .wrk import COUNT_SENT, run

PROXIES = ("lb", "nginx", "haproxy")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    up1: tuple[str, ...]  # bench.upstream's shaping flags for each upstream
    up2: tuple[str, ...]
    connections: int = 32
    seconds: float = 12.0
    timeout: float = 30.0  # wrk's per-request limit
    freeze: bool = False  # up1 stopped FREEZE_AT s in, for FREEZE_FOR s
    # wrk counts what it sends (a Lua call per request: not where wrk's own
    # speed is the point, the crowd)
    count_sent: bool = True


FREEZE_AT, FREEZE_FOR = 3.0, 6.0
CROWD = 4096
SCENARIOS = (
    Scenario("frozen", "one upstream frozen 6 s", (), (), connections=16, freeze=True),
    Scenario("both_slow", "both upstreams slow (400 ms)", ("--delay", "0.4"), ("--delay", "0.4")),
    Scenario("one_slow", "one upstream slow (1.5 s), one fast", ("--delay", "1.5"), ()),
    Scenario("failing_fast", "one upstream failing fast (503 in 1 ms)", ("--fail", "503"), ()),
    Scenario(
        "crowd",
        f"{CROWD:,} connections, fast upstreams",
        (),
        (),
        connections=CROWD,
        seconds=6.0,
        timeout=2.0,
        count_sent=False,
    ),
)


@dataclass(frozen=True)
class Row:
    scenario: str
    proxy: str
    requests: int
    rps: float
    failed: int
    timeouts: int
    ok_share: float  # answered 2xx/3xx, of all answered or timed out
    p50_ms: float
    p99_ms: float
    max_ms: float
    amplification: float  # requests the upstreams received per request sent
    queue_empty_after_s: float | None = None  # lb, crowd: queue 0 this long after the clients left


def _received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__requests", timeout=5) as answer:
        return int(answer.read())


def _queue_length(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(float(m) for m in re.findall(r"^lb_queue_length(?:\{[^}]*\})? (\S+)$", text, re.M))


def _queue_drained(admin: int, within: float = 5.0) -> float | None:
    """Seconds until lb's queue is empty after the load stopped (None: not within)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if _queue_length(admin) == 0:
            return round(time.monotonic() - start, 3)
        time.sleep(0.05)
    return None


@contextmanager
def _upstreams(work: Path, scenario: Scenario) -> Iterator[tuple[list[int], list[int]]]:
    ports = [free_port(), free_port()]
    pids = []
    with ExitStack() as stack:
        for i, (port, shape) in enumerate(zip(ports, (scenario.up1, scenario.up2), strict=True), 1):
            argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--count"]
            argv += ["--name", f"up{i}", *shape]
            log = work / f"{scenario.name}-up{i}.log"
            pids.append(stack.enter_context(running(argv, core=PROXY_CORE, port=port, log=log)).pid)
        try:
            yield ports, pids
        finally:
            for pid in pids:  # never leave one stopped
                os.kill(pid, signal.SIGCONT)


def measure(name: str, work: Path, scenario: Scenario) -> Row:
    script = work / "count.lua"
    script.write_text(COUNT_SENT)
    with _upstreams(work, scenario) as (ports, pids):
        port, admin = free_port(), free_port()
        argv = proxy_argv(name, work, port, *ports, admin=admin)
        with running(argv, core=PROXY_CORE, port=port, log=work / f"{scenario.name}-{name}.log"):
            url = f"http://127.0.0.1:{port}/"
            # warm: pools filled, the first checks have seen both upstreams up
            run(url, seconds=2, connections=min(scenario.connections, 64), core=LOAD_CORE)
            time.sleep(0.5)
            before = sum(_received(p) for p in ports)
            timers = []
            if scenario.freeze:
                timers = [
                    threading.Timer(FREEZE_AT, os.kill, (pids[0], signal.SIGSTOP)),
                    threading.Timer(FREEZE_AT + FREEZE_FOR, os.kill, (pids[0], signal.SIGCONT)),
                ]
            for timer in timers:
                timer.start()
            try:
                result = run(
                    url,
                    seconds=scenario.seconds,
                    connections=scenario.connections,
                    core=LOAD_CORE,
                    timeout=scenario.timeout,
                    script=str(script) if scenario.count_sent else None,
                )
            finally:
                for timer in timers:
                    timer.cancel()
                os.kill(pids[0], signal.SIGCONT)
            drained = _queue_drained(admin) if name == "lb" and scenario.name == "crowd" else None
            time.sleep(max(0.5, FREEZE_FOR if scenario.freeze else 0.0) / 2)
            received = sum(_received(p) for p in ports) - before
    answered = result.requests + result.timeouts
    return Row(
        scenario=scenario.name,
        proxy=name,
        requests=result.requests,
        rps=round(result.rps, 1),
        failed=result.errors,
        timeouts=result.timeouts,
        ok_share=round(1 - result.errors / answered, 5) if answered else 0.0,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
        amplification=round(received / result.sent, 3) if result.sent else 0.0,
        queue_empty_after_s=drained,
    )


def run_gray(
    *,
    scenarios: tuple[str, ...] = (),
    proxies: tuple[str, ...] = PROXIES,
    say: Callable[[str], None],
) -> dict[str, Any]:
    require("wrk", "taskset", *(p for p in proxies if p in ("nginx", "haproxy")))
    chosen = [s for s in SCENARIOS if not scenarios or s.name in scenarios]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-gray-") as tmp:
        for scenario in chosen:
            for name in proxies:
                say(
                    f"{scenario.title}: {name}, {scenario.seconds:g}s, {scenario.connections} conns"
                )
                rows.append(measure(name, Path(tmp), scenario))
    return {
        "benchmark": "gray",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "scenarios": {
            s.name: {
                **asdict(s),
                "rows": {r.proxy: asdict(r) for r in rows if r.scenario == s.name},
            }
            for s in chosen
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| scenario | proxy | req/s | failed | 200s | p50 ms | p99 ms | max ms | amplification |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in result["scenarios"].values():
        for name, r in scenario["rows"].items():
            extra = ""
            if scenario["name"] == "crowd" and name == "lb":
                after = r.get("queue_empty_after_s")
                extra = (
                    " (queue not empty 5 s after)"
                    if after is None
                    else (f" (queue empty {after:.2f} s after)")
                )
            amplification = f"{r['amplification']:.2f}" if r["amplification"] else "-"
            lines.append(
                f"| {scenario['title']} | {name}{extra} | {r['rps']:,.0f} | {r['failed']:,} | "
                f"{100 * r['ok_share']:.2f}% | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['max_ms']:.0f} | {amplification} |"
            )
    return "\n".join(lines)
