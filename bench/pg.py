"""`python -m bench pg`: pgbench direct, through HAProxy (tcp) and through dbproxy, in one run.

The bench brings up its own local stack (no proxies, on free ports), loads
pgbench's tables into a database of their own on the master, and runs each
mode against each path: select-only (-S), the default tpcb-like mix, and -S -C
(a new connection per transaction, where a proxy's connect path shows). The
proxy is pinned to core 0 and pgbench to core 1; Postgres itself runs
unpinned, the same for every path. Rounds interleave the paths, each round
starting with another one, and pgbench vacuums before every run; the median
counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .procs import BenchError, free_port, require, rotated, running

PATHS = ("direct", "haproxy", "dbproxy")
MODES = {"select-only": ["-S"], "tpcb-like": [], "select-only-connect": ["-S", "-C"]}
PROXY_CORE, LOAD_CORE = 0, 1
REPO = Path(__file__).resolve().parent.parent

HAPROXY_CFG = """
global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 1s
  timeout client 1m
  timeout server 1m
frontend pg
  bind 127.0.0.1:{port}
  default_backend master
backend master
  option pgsql-check user postgres
  server service-db 127.0.0.1:{master} check inter 1s rise 2 fall 2
"""


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    debian = Path("/usr/lib/postgresql/15/bin") / name
    if debian.exists():
        return str(debian)
    raise BenchError(f"{name} not found; `make setup` installs postgresql-15")


def _stack(args: list[str], state: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stack", *args, "--state-dir", str(state)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise BenchError(f"stack {args[0]} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def bench_stack(work: Path) -> Iterator[dict[str, Any]]:
    state = work / "stack"
    ports = {
        "master": free_port(),
        "replica": free_port(),
        "backend-1": free_port(),
        "backend-2": free_port(),
    }
    overrides = [a for k, v in ports.items() for a in ("--port", f"{k}={v}")]
    try:
        _stack(["up", "--users", "1000", *overrides], state)
        topology = json.loads((state / "state.json").read_text())["topology"]
        yield {
            "master": ports["master"],
            "check_password": topology["credentials"]["check_password"],
        }
    finally:
        subprocess.run(
            [sys.executable, "-m", "stack", "down", "--purge", "--state-dir", str(state)],
            cwd=REPO,
            capture_output=True,
            timeout=120,
        )


def scale_for(clients: int) -> int:
    """pgbench's own advice: a scale below the client count mostly measures row-lock
    contention on pgbench_branches, which makes tpcb-like swing from run to run."""
    return max(clients, 1)


def _pgbench(port: int, mode: list[str], seconds: float, clients: int, init: bool = False) -> float:
    base = [_pg_bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    if init:
        scale = str(scale_for(clients))
        subprocess.run(
            [*base, "-i", "-q", "-s", scale, "bench"], check=True, capture_output=True, timeout=300
        )
        return 0.0
    # No -n: pgbench vacuums its tables before each run, so a tpcb-like run does
    # not meet the bloat the runs before it left (which would favour the first path).
    command = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        *base,
        "-c",
        str(clients),
        "-j",
        "1",
        "-T",
        f"{seconds:g}",
        *mode,
        "bench",
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise BenchError(f"pgbench failed: {out.stderr.strip()[-400:]}")
    m = re.search(r"^tps = ([0-9.]+)", out.stdout, re.MULTILINE)
    if not m:
        raise BenchError(f"unexpected pgbench output:\n{out.stdout[-400:]}")
    return float(m.group(1))


@contextlib.contextmanager
def path_port(path: str, master: int, check_password: str, work: Path) -> Iterator[int]:
    if path == "direct":
        yield master
        return
    port = free_port()
    if path == "haproxy":
        cfg = work / "haproxy-pg.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, master=master))
        argv = ["haproxy", "-db", "-f", str(cfg)]
        env = None
    else:
        argv = [
            sys.executable,
            "-m",
            "dbproxy",
            "--listen",
            f"rw=127.0.0.1:{port}",
            "--server",
            f"service-db=127.0.0.1:{master}",
            "--admin",
            "off",
            "--check-database",
            "postgres",
        ]
        env = {"DBPROXY_CHECK_PASSWORD": check_password}
    with running(argv, core=PROXY_CORE, port=port, log=work / f"{path}.log", env=env):
        yield port


def run_pg(
    *, seconds: float, clients: int, rounds: int, say: Callable[[str], None]
) -> dict[str, Any]:
    require("taskset", "haproxy")
    tps: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PATHS} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        work = Path(tmp)
        say("starting a local stack for the benchmark")
        with bench_stack(work) as stack:
            master = stack["master"]
            subprocess.run(
                [
                    _pg_bin("psql"),
                    "-X",
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(master),
                    "-U",
                    "postgres",
                    "-c",
                    "CREATE DATABASE bench",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            say(f"pgbench -i -s {scale_for(clients)}")
            _pgbench(master, [], 0, clients, init=True)
            for r in range(1, rounds + 1):
                for path in rotated(PATHS, r):
                    with path_port(path, master, stack["check_password"], work) as port:
                        for mode, flags in MODES.items():
                            say(f"round {r}/{rounds}: {path} {mode} ({seconds:g}s)")
                            tps[mode][path].append(_pgbench(port, flags, seconds, clients))
    medians = {m: {p: statistics.median(v) for p, v in paths.items()} for m, paths in tps.items()}
    return {
        "benchmark": "pg",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cores": os.cpu_count() or 0,
        "settings": {
            "seconds": seconds,
            "clients": clients,
            "rounds": rounds,
            "scale": scale_for(clients),
            "proxy_core": PROXY_CORE,
            "load_core": LOAD_CORE,
        },
        "tps": medians,
        "ratios_to_haproxy": {m: round(v["dbproxy"] / v["haproxy"], 3) for m, v in medians.items()},
        "rounds": tps,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| mode | direct tps | HAProxy tps | dbproxy tps | dbproxy / HAProxy |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, v in result["tps"].items():
        lines.append(
            f"| {mode} | {v['direct']:,.0f} | {v['haproxy']:,.0f} | {v['dbproxy']:,.0f} | "
            f"{result['ratios_to_haproxy'][mode]:.2f} |"
        )
    return "\n".join(lines)
