"""Running wrk and reading its numbers."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    max_ms: float = 0.0  # the slowest request


def _duration(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(output: str) -> WrkResult:
    requests = re.search(r"(\d+) requests in ([0-9.]+)(\w+)", output)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    slowest = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.MULTILINE)
    if not (requests and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(g) for g in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(m.group(1))
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=_duration(requests.group(2) + requests.group(3)),
        rps=float(rps.group(1)),
        p50_ms=_duration(p50.group(1)) * 1000,
        p99_ms=_duration(p99.group(1)) * 1000,
        errors=errors,
        max_ms=_duration(slowest.group(1)) * 1000 if slowest else 0.0,
    )


def run(
    url: str, *, seconds: float, connections: int, core: int | None, timeout: float = 2.0
) -> WrkResult:
    """``timeout``: wrk's per-request limit; a request over it counts as an error."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s"]
    command += ["--latency", url]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse(out.stdout)
