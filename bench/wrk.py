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
    timeouts: int = 0  # requests with no answer within wrk's --timeout (among errors)
    non_2xx: int = 0  # answered, but not 2xx or 3xx (among errors)
    sent: int = 0  # requests wrk sent, answered or not (with COUNT_SENT only)


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
    errors = timeouts = non_2xx = 0
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(g) for g in m.groups())
        timeouts = int(m.group(4))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        non_2xx = int(m.group(1))
        errors += non_2xx
    sent = re.search(r"^SENT (\d+)$", output, re.MULTILINE)
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=_duration(requests.group(2) + requests.group(3)),
        rps=float(rps.group(1)),
        p50_ms=_duration(p50.group(1)) * 1000,
        p99_ms=_duration(p99.group(1)) * 1000,
        errors=errors,
        max_ms=_duration(slowest.group(1)) * 1000 if slowest else 0.0,
        timeouts=timeouts,
        non_2xx=non_2xx,
        sent=int(sent.group(1)) if sent else 0,
    )


# A wrk script that counts the requests it sends (answered or still in flight
# when the run ends), so that what reached the servers can be set against it.
COUNT_SENT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0 end
function request() sent = sent + 1; return wrk.format() end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("sent") end
  io.write(string.format("SENT %d\\n", total))
end
"""


def run(
    url: str,
    *,
    seconds: float,
    connections: int,
    core: int | None,
    timeout: float = 2.0,
    script: str | None = None,
    headers: tuple[str, ...] = (),
) -> WrkResult:
    """``timeout``: wrk's per-request limit; a request over it counts as an error.
    ``script``: a Lua script's path (COUNT_SENT's, for ``sent``)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s"]
    if script is not None:
        command += ["-s", script]
    for header in headers:
        command += ["-H", header]
    command += ["--latency", url]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse(out.stdout)
