"""`python -m bench`: the classic proxies and ours, side by side, with numbers and pictures.

For each profile (python: lb + dbproxy; classic: nginx + HAProxy), on the local
stack: wrk through the entry port (req/s, latency, the proxies' CPU per
request), then the failure drill of the design notes under an open-loop load
that records every request. Around them, the proxies alone: `bench http` (lb vs
nginx over fixed upstreams) and `bench pg` (pgbench through dbproxy vs HAProxy).

Writes DIR/results.json, DIR/REPORT.md, PNG charts, and every request of each
drill in DIR/requests-<profile>.csv (step, step_name, kind, sent_s, latency_ms,
status, retry_after, served_by; status 0: no answer, -1: not sent). results.json,
schema 1:

    schema            1
    date, cores, python, mode ("quick" | "full"), settings {...}, command
    profiles.<profile>:
      entry           {rps, p50_ms, p99_ms, errors, proxy_cpu_us_per_request}
      drill           {rate, step_seconds, latency_ms {p50, p99, p99.9} (all-up step),
                       steps: [{name, action, started_s, action_done_s, ended_s, reads,
                                read_errors, writes, write_errors, writes_refused,
                                kill_to_clean_s, restart_to_traffic_s, p99_ms,
                                slowest_read_ms}],
                       timeline: [{t, ok, errors, p99_ms}]}
    http              the result of `bench http` for the profiles' HTTP proxies
    pg                the result of `bench pg` for direct and the profiles' DB proxies
    ratios            python ÷ classic for each comparable figure (both profiles only)

Time is in seconds unless the name says otherwise; a figure that could not be
measured is null.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from stack.topology import MASTER, PROXIES, REPLICA

from . import charts
from .drill import FREEZE_SECONDS, STEPS, DrillResult, StackControl, run_drill, seeded_user_ids
from .drillstats import latency_ms, step_stats, timeline
from .entry import EntryMeasure, measure_entry, proxy_pids
from .http import measure_idle_connections, run_http
from .http import table as http_table
from .idle import table as idle_table
from .pg import run_pg
from .pg import table as pg_table
from .procs import machine, require
from .ryw import measure as read_your_writes
from .stackrun import LocalStack, local_stack

PROFILES = ("python", "classic")


def http_proxy(profile: str) -> str:
    return PROXIES[profile][1][0]


def db_proxy(profile: str) -> str:
    return PROXIES[profile][0][0]


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each part runs; `Plan.quick_run` is about two minutes in all."""

    profiles: tuple[str, ...]
    quick: bool = False
    seconds: float = 10.0  # each throughput run
    rounds: int = 3
    users: int = 20_000
    drill_rate: float = 200.0
    step_seconds: float = 8.0
    ryw_pairs: int = 2_000  # register-then-get pairs, each way (bench/ryw.py)

    @classmethod
    def quick_run(cls, profiles: tuple[str, ...]) -> Plan:
        return cls(
            profiles,
            quick=True,
            seconds=3.0,
            rounds=1,
            users=2_000,
            drill_rate=100.0,
            step_seconds=2.5,
            ryw_pairs=200,
        )

    def phases(self) -> list[tuple[str, float]]:
        """(what, expected seconds), for the progress line."""
        http = len(self.profiles) * self.rounds * (self.seconds + 2) + 30  # and idle memory
        pg = (1 + len(self.profiles)) * 3 * self.rounds * self.seconds + 8
        per_profile = [
            (
                f"{p}: stack up, entry, read your writes and drill",
                8
                + 1
                + self.seconds
                + self.ryw_pairs / 75  # both ways, at about 150 pairs a second
                + len(STEPS) * (self.step_seconds + 1.5)
                + 2 * FREEZE_SECONDS,
            )
            for p in self.profiles
        ]
        return [("bench http", http), ("bench pg", pg), *per_profile]


class Progress:
    def __init__(self, phases: list[tuple[str, float]], say: Callable[[str], None]) -> None:
        self.phases = phases
        self.say = say
        self.index = -1
        self.started = time.monotonic()

    def next(self) -> None:
        self.index += 1
        name, _ = self.phases[self.index]
        left = sum(s for _, s in self.phases[self.index :])
        elapsed = time.monotonic() - self.started
        self.say(
            f"== {self.index + 1}/{len(self.phases)} {name} "
            f"(elapsed {elapsed:.0f}s, about {left:.0f}s left)"
        )


async def _has_app_sessions(port: int) -> bool:
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user="postgres", database="postgres", timeout=1.0
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'users_app'")
        return bool(n)
    finally:
        await conn.close()


async def _drill(
    stack: LocalStack, profile: str, plan: Plan, say: Callable[[str], None]
) -> DrillResult:
    port_of = {MASTER: stack.ports.master, REPLICA: stack.ports.replica}

    async def db_sessions(service: str) -> bool:
        return await _has_app_sessions(port_of[service])

    return await run_drill(
        stack.entry,
        StackControl(stack.state_dir),
        profile=profile,
        rate=plan.drill_rate,
        step_seconds=plan.step_seconds,
        say=say,
        db_sessions=db_sessions,
    )


def _profile_run(
    work: Path, profile: str, plan: Plan, say: Callable[[str], None]
) -> tuple[EntryMeasure, dict[str, Any], DrillResult]:
    with local_stack(work, profile=profile, users=plan.users) as stack:
        say(f"[{profile}] wrk through the entry port ({plan.seconds:g}s)")
        path = f"/user/get/{asyncio.run(seeded_user_ids(stack.entry, count=1))[0]}"
        entry = measure_entry(
            stack.ports.entry, path, proxy_pids(stack.state_dir, profile), seconds=plan.seconds
        )
        say(f"[{profile}] register, then read back at once: {plan.ryw_pairs} pairs each way")
        ryw = read_your_writes(stack.entry, plan.ryw_pairs)
        drill = asyncio.run(_drill(stack, profile, plan, say))
    return entry, ryw, drill


def _clean(value: Any) -> Any:
    """NaN → None, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_compare(
    plan: Plan, out_dir: Path, say: Callable[[str], None], command: str
) -> dict[str, Any]:
    require("wrk", "taskset", *("nginx", "haproxy") if "classic" in plan.profiles else ())
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(plan.phases(), say)
    result: dict[str, Any] = {
        "schema": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "mode": "quick" if plan.quick else "full",
        "command": command,
        "settings": {
            "throughput_seconds": plan.seconds,
            "rounds": plan.rounds,
            "users": plan.users,
            "drill_rate": plan.drill_rate,
            "drill_step_seconds": plan.step_seconds,
        },
        "profiles": {},
    }
    progress.next()
    result["http"] = run_http(
        seconds=plan.seconds,
        connections=50,
        rounds=plan.rounds,
        proxies=tuple(http_proxy(p) for p in PROFILES if p in plan.profiles),
        say=say,
    )
    if set(PROFILES) <= set(plan.profiles):
        result["http"]["idle"] = measure_idle_connections(say)
    progress.next()
    result["pg"] = run_pg(
        seconds=plan.seconds,
        clients=8,
        rounds=plan.rounds,
        paths=("direct", *(db_proxy(p) for p in PROFILES if p in plan.profiles)),
        say=say,
    )
    drills: dict[str, DrillResult] = {}
    work = out_dir / "work"
    for profile in plan.profiles:
        progress.next()
        entry, ryw, drill = _profile_run(work, profile, plan, say)
        drills[profile] = drill
        result["profiles"][profile] = {
            "entry": dataclasses.asdict(entry),
            "read_your_writes": ryw,
            "drill": {
                "rate": drill.rate,
                "step_seconds": drill.step_seconds,
                "latency_ms": latency_ms(drill),
                "steps": [dataclasses.asdict(s) for s in step_stats(drill)],
                "timeline": [dataclasses.asdict(s) for s in timeline(drill)],
            },
        }
        write_requests(drill, out_dir / f"requests-{profile}.csv")
        charts.drill_timeline(
            drill,
            out_dir / f"drill-{profile}.png",
            subtitle=f"{result['date'][:10]}, {result['cores']} cores, "
            f"{'quick' if plan.quick else 'full'} run",
        )
    if set(PROFILES) <= set(plan.profiles):
        result["ratios"] = ratios(result)
        charts.ratio_bars(
            result["ratios"],
            out_dir / "ratios.png",
            title="python profile (lb + dbproxy) ÷ classic profile (nginx + HAProxy)",
            note=f"{result['date'][:10]}, {result['cores']} cores",
        )
    result = _clean(result)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "REPORT.md").write_text(report(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def write_requests(drill: DrillResult, path: Path) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "step",
                "step_name",
                "kind",
                "sent_s",
                "latency_ms",
                "status",
                "retry_after",
                "served_by",
            ]
        )
        for o in sorted(drill.outcomes, key=lambda o: o.sent):
            out.writerow(
                [
                    o.step,
                    drill.steps[o.step].name,
                    o.kind,
                    f"{o.sent:.4f}",
                    f"{o.latency * 1000:.2f}",
                    o.status,
                    int(o.retry_after),
                    o.served_by,
                ]
            )


def ratios(result: dict[str, Any]) -> dict[str, float]:
    py, cl = result["profiles"]["python"], result["profiles"]["classic"]
    http = result["http"]["proxies"]
    pg = result["pg"]
    out = {
        "entry req/s": py["entry"]["rps"] / cl["entry"]["rps"],
        "entry proxy CPU per request": py["entry"]["proxy_cpu_us_per_request"]
        / cl["entry"]["proxy_cpu_us_per_request"],
        "http req/s (lb ÷ nginx)": http["lb"]["rps"] / http["nginx"]["rps"],
        "http CPU per request (lb ÷ nginx)": http["lb"]["cpu_us_per_request"]
        / http["nginx"]["cpu_us_per_request"],
    }
    for mode, tps in pg["tps"].items():
        out[f"pg {mode} tps (dbproxy ÷ HAProxy)"] = tps["dbproxy"] / tps["haproxy"]
    for mode, cpu in pg["cpu_us_per_transaction"].items():
        out[f"pg {mode} CPU per tx (dbproxy ÷ HAProxy)"] = cpu["dbproxy"] / cpu["haproxy"]
    return {k: round(v, 3) for k, v in out.items()}


def _fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:{spec}}{unit}"


def report(result: dict[str, Any]) -> str:
    profiles = list(result["profiles"])
    # .get: results written before the interpreter was recorded have no "python"
    # (tests/test_bench_units.py renders a committed one of 2026-11-25)
    lines = [
        f"# balance: python and classic proxies side by side ({result['mode']} run)",
        "",
        f"{result['date']}, {result['cores']} cores, Python {result.get('python', '?')}. "
        f"Command: `{result['command']}`. "
        "Definitions and the JSON schema: `bench/compare.py` and `bench/drillstats.py`.",
        "",
        "## The whole stack, per profile",
        "",
        "| | " + " | ".join(profiles) + " |",
        "|---|" + "---:|" * len(profiles),
    ]
    rows = [
        ("entry req/s (wrk, closed loop)", lambda p: _fmt(p["entry"]["rps"], ",.0f")),
        (
            "entry p50 / p99 ms (wrk)",
            lambda p: f"{p['entry']['p50_ms']:.2f} / {p['entry']['p99_ms']:.2f}",
        ),
        (
            "proxies' CPU µs per request",
            lambda p: _fmt(p["entry"]["proxy_cpu_us_per_request"], ".1f"),
        ),
        (
            f"drill, all up: p50 / p99 / p99.9 ms at {result['settings']['drill_rate']:g} req/s",
            lambda p: " / ".join(
                _fmt(p["drill"]["latency_ms"][k]) for k in ("p50", "p99", "p99.9")
            ),
        ),
        (
            "drill: failed reads, all steps",
            lambda p: str(sum(s["read_errors"] for s in p["drill"]["steps"])),
        ),
        (
            "drill: failed writes (of which 503 + Retry-After)",
            lambda p: (
                f"{sum(s['write_errors'] for s in p['drill']['steps'])} "
                f"({sum(s['writes_refused'] for s in p['drill']['steps'])})"
            ),
        ),
    ]
    if all("read_your_writes" in result["profiles"][p] for p in profiles):
        # (runs before 2026-12-07 did not measure it)
        rows.insert(
            3,
            (
                "a user read back at once, not found: with / without its token",
                lambda p: (
                    f"{p['read_your_writes']['with_token']['not_found']} / "
                    f"{p['read_your_writes']['without_token']['not_found']} "
                    f"of {p['read_your_writes']['pairs']:,}"
                ),
            ),
        )
    for label, cell in rows:
        lines.append(
            f"| {label} | " + " | ".join(cell(result["profiles"][p]) for p in profiles) + " |"
        )
    lines += [
        "",
        "## The failure drill, step by step",
        "",
        "Reads and writes that failed in each step (writes refused with 503 + Retry-After "
        "in brackets); p99: of every answered request sent in the step; slowest read: "
        "the longest an answered read took; kill → clean: "
        "seconds from the kill to the first whole second, after the step's last failed "
        "read, in which every read answered 200 (0: no read failed); "
        "restart → traffic: seconds from the start command to the first request the "
        "restarted server served.",
        "",
        "| step | "
        + " | ".join(
            f"{p} failed reads | {p} failed writes | {p} p99 ms | {p} slowest read ms | "
            f"{p} kill → clean / restart → traffic"
            for p in profiles
        )
        + " |",
        "|---|" + "---:|---:|---:|---:|---:|" * len(profiles),
    ]
    steps = result["profiles"][profiles[0]]["drill"]["steps"]
    for i, step in enumerate(steps):
        cells = []
        for p in profiles:
            s = result["profiles"][p]["drill"]["steps"][i]
            recovery = (
                s["kill_to_clean_s"]
                if s["kill_to_clean_s"] is not None
                else s["restart_to_traffic_s"]
            )
            cells += [
                f"{s['read_errors']}/{s['reads']}",
                f"{s['write_errors']}/{s['writes']} ({s['writes_refused']})",
                _fmt(s["p99_ms"], ".1f"),
                _fmt(s.get("slowest_read_ms"), ".0f"),
                _fmt(recovery, ".2f", " s") if recovery is not None else "",
            ]
        lines.append(f"| {step['name']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![drill timeline, {p}](drill-{p}.png)" for p in profiles), ""]
    lines += [
        "## The proxies alone",
        "",
        "HTTP (`bench http`, fixed upstreams):",
        "",
        http_table(result["http"]),
        "",
    ]
    if "idle" in result["http"]:
        lines += [
            "Idle keep-alive connections (`bench/idle.py`):",
            "",
            idle_table(result["http"]["idle"]),
            "",
        ]
    lines += ["PostgreSQL (`bench pg`, pgbench):", "", pg_table(result["pg"]), ""]
    if "ratios" in result:
        lines += [
            "## Ratios, python ÷ classic",
            "",
            "| measure | ratio |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()),
            "",
            "![ratios](ratios.png)",
            "",
        ]
    return "\n".join(lines)
