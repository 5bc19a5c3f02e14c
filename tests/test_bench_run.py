"""`python -m bench --quick` end to end on one profile: the files a user gets, in their shape.

Speed is not judged here (the benchmark reports it); this checks the command
works on this machine and writes the documented results.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.drill import STEPS
from tests.stackctl import REPO


def test_quick_run_of_one_profile_writes_json_report_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--profile", "python", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "about" in run.stderr and "left" in run.stderr  # progress while it ran

    result = json.loads((out / "results.json").read_text())
    assert result["schema"] == 1 and result["mode"] == "quick" and result["cores"] >= 1
    # which interpreter ran it: its build moves the Python processes' CPU per request
    assert result["python"] == f"{platform.python_version()} {os.path.realpath(sys.executable)}"
    assert result["http"]["python"] == result["pg"]["python"] == result["python"]
    assert list(result["profiles"]) == ["python"] and "ratios" not in result
    python = result["profiles"]["python"]
    assert python["entry"]["rps"] > 0 and python["entry"]["proxy_cpu_us_per_request"] > 0
    steps = python["drill"]["steps"]
    assert [s["name"] for s in steps] == [s.name for s in STEPS]
    assert sum(s["reads"] for s in steps) > 0
    assert all(s["read_errors"] == 0 for s in steps), steps  # the python profile's promise
    assert set(python["drill"]["latency_ms"]) == {"p50", "p99", "p99.9"}
    assert list(result["http"]["proxies"]) == ["lb"]
    assert set(next(iter(result["pg"]["tps"].values()))) == {"direct", "dbproxy"}

    report = (out / "REPORT.md").read_text()
    assert "## The failure drill, step by step" in report and "drill-python.png" in report
    assert (out / "drill-python.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "requests-python.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(s["reads"] + s["writes"] for s in steps)
    assert {r["step_name"] for r in rows} == {s.name for s in STEPS}
    assert not (out / "work").exists()  # the stack it ran was taken down and removed


def test_idle_connections_are_measured_and_the_proxy_stopped(tmp_path: Path) -> None:
    """bench/idle.py on a small scale: lb in front of bench's upstreams holds
    every client it was given, its growth is reported, and it is stopped after."""
    from bench.http import proxy_argv, upstreams
    from bench.idle import measure_idle
    from bench.procs import free_port
    from stack import processes

    with upstreams(tmp_path, core=None) as (up1, up2):
        port = free_port()
        argv = proxy_argv("lb", tmp_path, port, up1, up2)
        row = measure_idle("lb", argv, port, None, tmp_path, base=20, more=300)
    # (300 more may fit in memory the process had already: no growth is a fair answer)
    assert row["connections"] == 300 and row["rss_after_kib"] >= row["rss_before_kib"] > 0
    assert row["kib_per_connection"] == round(
        (row["rss_after_kib"] - row["rss_before_kib"]) / 300, 2
    )
    assert processes.ref_of(row["pid"]) is None
