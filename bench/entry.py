"""End to end through a running stack: wrk at the entry port, and what the proxies spent.

Closed loop, saturating: the backends (Python, two of them) set the ceiling,
the same for both profiles, so the figure that tells the profiles apart is the
proxies' CPU per request (HTTP proxy + database proxy, all their processes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stack.topology import PROXIES

from .procs import cpu_seconds
from .wrk import run


@dataclass(frozen=True, slots=True)
class EntryMeasure:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_cpu_us_per_request: float


def proxy_pids(state_dir: Path, profile: str) -> list[int]:
    processes = json.loads((state_dir / "state.json").read_text())["processes"]
    db_proxies, http_proxies = PROXIES[profile]
    return [processes[name]["pid"] for name in (*http_proxies, *db_proxies)]


def measure_entry(
    entry_port: int, path: str, pids: list[int], *, seconds: float, connections: int = 32
) -> EntryMeasure:
    url = f"http://127.0.0.1:{entry_port}{path}"
    run(url, seconds=1, connections=connections, core=None)  # warm up: pools, caches
    before = sum(cpu_seconds(pid) for pid in pids)
    result = run(url, seconds=seconds, connections=connections, core=None)
    used = sum(cpu_seconds(pid) for pid in pids) - before
    return EntryMeasure(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        proxy_cpu_us_per_request=used * 1e6 / max(result.requests, 1),
    )
