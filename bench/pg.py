"""`python -m bench pg`: pgbench direct, through HAProxy (tcp) and through dbproxy, in one run.

The bench brings up its own local stack (no proxies, on free ports), drops its
logical replication (see run_pg), loads pgbench's tables into a database of
their own on the master, and runs each mode against each path: select-only
(-S), the default tpcb-like mix, and -S -C (a new connection per transaction,
where a proxy's connect path shows). Both proxies are started afresh for each
turn and run through it, pinned to core 0, and pgbench to core 1; Postgres
itself runs unpinned, the same for every path. In each round the paths take
turns mode by mode: a mode's turn is cut into slices of SLICE_SECONDS, the
paths in order, then backwards, and so on (see interleaved), each turn
starting with another path. Before every turn the four pgbench tables are
vacuumed as pgbench -v does (autovacuum is off on them: see _NO_AUTOVACUUM)
and a CHECKPOINT writes out what the turn before dirtied, so no turn pays for
another's writes. A turn during which the hypervisor took more than
STEAL_LIMIT of a core (steal, read from /proc/stat) is run again. The median
of the rounds counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

from stack.postgres import connect

from .procs import (
    BenchError,
    cpu_seconds,
    free_port,
    machine,
    require,
    rotated,
    running,
    stolen_seconds,
)
from .stackrun import local_stack

PATHS = ("direct", "haproxy", "dbproxy")
MODES = {"select-only": ["-S"], "tpcb-like": [], "select-only-connect": ["-S", "-C"]}
PROXY_CORE, LOAD_CORE = 0, 1

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


# The paths' runs of a mode within a round are cut into slices this long, taken
# in turn: the machine's speed drifts within seconds (2 s runs of one path, back
# to back, differ by 10% and more), so the shorter the stretch between the runs
# a ratio compares, the less of that drift it carries. Measured on 2026-12-01 with both
# proxies up: the round's dbproxy / HAProxy ratio from five 2 s slices each, in
# turn, had a standard deviation of 0.042 (-S -C) and 0.048 (-S) over six
# rounds, where one 10 s run each, 10-20 s apart, had 0.125 and 0.078 over 30.
SLICE_SECONDS: Final = 2

# A mode's turn (every path's slices of it, within one round) is run again when
# the hypervisor took more than this share of either core, in percent, during
# any path's slices: up to TURN_REDOS times, then the least stolen attempt is
# kept (see kept_turn). Seen on 2026-12-01: runs during which it took 5-44% of a
# core, their tps down by a quarter to a half for whichever path ran then. Steal
# is no path's doing, and a turn is redone for every path alike.
STEAL_LIMIT: Final = 2.0
TURN_REDOS: Final = 2


def stolen_from(turn: dict[str, dict[str, float]], limit: float = STEAL_LIMIT) -> str | None:
    """Why a turn does not count, if it does not: the first path, in the turn's order,
    during whose slices the hypervisor took more than ``limit`` percent of a core."""
    for path, shares in turn.items():
        for core, share in shares.items():
            if share > limit:
                where = core.replace("_", " ")
                return f"the hypervisor took {share:.1f}% of the {where} during {path}'s slices"
    return None


def slicing(seconds: float) -> tuple[int, int]:
    """How many slices of how many whole seconds (pgbench's -T takes no fraction)
    make about ``seconds`` of a path's run: (5, 2) for 10."""
    count = max(1, int(seconds // SLICE_SECONDS))
    return count, max(1, round(seconds / count))


def interleaved(order: tuple[str, ...], slices: int) -> list[str]:
    """The slices of a turn, ``slices`` per path: the paths in order, then backwards,
    and so on, so a drift of the machine's during the turn falls on each path
    nearly alike (a path running last in one pass runs first in the next)."""
    sequence: list[str] = []
    for n in range(slices):
        sequence.extend(order if n % 2 == 0 else order[::-1])
    return sequence


def most_stolen(turn: dict[str, dict[str, float]]) -> float:
    """The largest share of a core, in percent, the hypervisor took during any run of a turn."""
    return max((share for shares in turn.values() for share in shares.values()), default=0.0)


def kept_turn(attempts: list[dict[str, dict[str, float]]]) -> int:
    """Which attempt at a turn counts: the first with no run over the limit, else the
    least stolen (the last is no better than the others for being the last)."""
    return min(range(len(attempts)), key=lambda i: most_stolen(attempts[i]))


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    debian = Path("/usr/lib/postgresql/15/bin") / name
    if debian.exists():
        return str(debian)
    raise BenchError(f"{name} not found; `make setup` installs postgresql-15")


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
    # -n: no vacuum here, one per turn instead (_VACUUM), not one per slice.
    command = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        *base,
        "-n",
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


def _superuser(port: int, *statements: str, database: str = "postgres") -> None:
    """Statements as the superuser, one by one (VACUUM will not run in a block of
    several), over stack.postgres's own connection."""

    async def run() -> None:
        conn = await connect(port, database)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


# No autovacuum on pgbench's tables: its worker comes every autovacuum_naptime
# (60 s) to the tables tpcb-like dirties, a period that can lock onto the bench's
# own (it did when each path ran its three modes in a row: the same path's
# tpcb-like run, dbproxy's, in each of three rounds, seen with
# pg_stat_user_tables after every run) and slow one path's runs. The vacuum
# before each turn (_VACUUM) does that work instead, between turns, for every path
# alike.
_NO_AUTOVACUUM: Final = tuple(
    f"ALTER TABLE pgbench_{table} SET (autovacuum_enabled = off)"
    for table in ("accounts", "branches", "tellers", "history")
)
# What pgbench -v does before a run, then a CHECKPOINT: each turn starts with no
# dead rows and no dirty pages left by the one before (tpcb-like writes; else the
# checkpointer writes them out during the next turn).
_VACUUM: Final = (
    "VACUUM pgbench_branches",
    "VACUUM pgbench_tellers",
    "TRUNCATE pgbench_history",
    "VACUUM ANALYZE pgbench_accounts",
    "CHECKPOINT",
)
_CORES: Final = (PROXY_CORE, LOAD_CORE)


class Slice(NamedTuple):
    tps: float
    seconds: int  # as asked of pgbench
    cpu: float  # the proxy's CPU time during it, in seconds
    wall: float  # how long it took, pgbench's start included
    stolen: list[float]  # what the hypervisor took of each core (_CORES), in seconds


class Run(NamedTuple):
    """A path's slices of one turn, summed up."""

    tps: float
    cpu: float | None  # the proxy's, in µs per transaction (None: direct)
    steal: dict[str, float]  # the share of each core the hypervisor took, in percent
    slices: list[float]  # each slice's tps, in the order run


def _slice(port: int, pid: int | None, flags: list[str], seconds: int, clients: int) -> Slice:
    before = cpu_seconds(pid) if pid is not None else 0.0
    stolen, started = stolen_seconds(_CORES), time.monotonic()
    rate = _pgbench(port, flags, seconds, clients)
    wall = time.monotonic() - started
    taken = [b - a for a, b in zip(stolen, stolen_seconds(_CORES), strict=True)]
    used = cpu_seconds(pid) - before if pid is not None else 0.0
    return Slice(rate, seconds, used, wall, taken)


def summed(slices: list[Slice], proxy: bool) -> Run:
    """A path's run of a turn from its slices: their tps weighted by length, the
    proxy's CPU per transaction over all of them, the share of each core stolen."""
    transactions = sum(s.tps * s.seconds for s in slices)
    tps = transactions / sum(s.seconds for s in slices)
    cpu = sum(s.cpu for s in slices) / transactions * 1e6 if proxy else None
    wall = sum(s.wall for s in slices)
    shares = {
        name: round(sum(s.stolen[i] for s in slices) / wall * 100, 1)
        for i, name in enumerate(("proxy_core", "load_core"))
    }
    return Run(tps, cpu, shares, [round(s.tps, 1) for s in slices])


def steal_of(runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    return {path: run.steal for path, run in runs.items()}


def haproxy_argv(port: int, master: int, work: Path) -> list[str]:
    """HAProxy in TCP mode on ``port`` in front of the master, its file in ``work``."""
    cfg = work / "haproxy-pg.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, master=master))
    return ["haproxy", "-db", "-f", str(cfg)]


def dbproxy_argv(port: int, master: int, *flags: str) -> list[str]:
    """dbproxy's rw listener on ``port`` in front of the master, no admin listener."""
    return [
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
        *flags,
    ]


@contextlib.contextmanager
def path_port(
    path: str, master: int, check_password: str, work: Path
) -> Iterator[tuple[int, int | None]]:
    """The port to point pgbench at, and the PID of the proxy behind it (None: direct)."""
    if path == "direct":
        yield master, None
        return
    port = free_port()
    if path == "haproxy":
        argv = haproxy_argv(port, master, work)
        env = None
    else:
        argv = dbproxy_argv(port, master)
        env = {"DBPROXY_CHECK_PASSWORD": check_password}
    with running(argv, core=PROXY_CORE, port=port, log=work / f"{path}.log", env=env) as proc:
        yield port, proc.pid


def run_pg(
    *,
    seconds: float,
    clients: int,
    rounds: int,
    say: Callable[[str], None],
    paths: tuple[str, ...] = PATHS,
) -> dict[str, Any]:
    require("taskset", *(p for p in paths if p == "haproxy"))
    tps: dict[str, dict[str, list[float]]] = {m: {p: [] for p in paths} for m in MODES}
    # The proxy's own CPU per transaction: steadier than tps, which Postgres and
    # the shared cores make swing from round to round.
    proxies = [p for p in paths if p != "direct"]
    cpu: dict[str, dict[str, list[float]]] = {m: {p: [] for p in proxies} for m in MODES}
    # What the hypervisor took from each core during each run, in percent: the
    # rounds that run slow for every path are the first thing to hold against it.
    steal: dict[str, dict[str, list[dict[str, float]]]] = {m: {p: [] for p in paths} for m in MODES}
    # Each slice's tps: whether a round's ratio comes from one slice or from all.
    sliced: dict[str, dict[str, list[list[float]]]] = {m: {p: [] for p in paths} for m in MODES}
    redone: list[dict[str, Any]] = []
    slices, length = slicing(seconds)
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp, contextlib.ExitStack() as up:
        work = Path(tmp)
        say("starting a local stack for the benchmark")
        stack = up.enter_context(local_stack(work, profile="none", users=1000))
        master = stack.ports.master
        # The stack's logical replication plays no part here, yet it is busy:
        # its walsender wakes at every commit and decodes the WAL, bench's
        # too (though it sends none of it), and once caught up pings the apply
        # worker, which answers. Measured: 1.6 s of their CPU in 8 s of
        # tpcb-like (a fifth of a core, on the proxy's core or pgbench's as
        # the scheduler has it) and 13% more direct tpcb-like tps without it.
        # Dropping the subscription (infra/postgres/subscription.sql) stops
        # both and its slot, so the master keeps no WAL for it either.
        _superuser(stack.ports.replica, "DROP SUBSCRIPTION users_sub", database="users")
        _superuser(master, "CREATE DATABASE bench")
        say(f"pgbench -i -s {scale_for(clients)}")
        _pgbench(master, [], 0, clients, init=True)
        _superuser(master, *_NO_AUTOVACUUM, database="bench")
        password = stack.check_password

        def turn(order: tuple[str, ...], mode: str, label: str) -> dict[str, Run]:
            say(f"{label}: {mode}, {slices} slices of {length}s each: {', '.join(order)}")
            taken: dict[str, list[Slice]] = {path: [] for path in order}
            # Every proxy is up for the whole turn, idle but for its health
            # checks while another path runs, so every path's slices meet the
            # same checks; and started afresh for each turn, so that whatever a
            # process carries (its heap after thousands of sessions, where its
            # memory fell) holds for one turn of a run, not for all of them.
            with contextlib.ExitStack() as proxies:
                ports = {
                    p: proxies.enter_context(path_port(p, master, password, work)) for p in order
                }
                _superuser(master, *_VACUUM, database="bench")
                for path in interleaved(order, slices):
                    port, pid = ports[path]
                    taken[path].append(_slice(port, pid, MODES[mode], length, clients))
            return {path: summed(runs, path != "direct") for path, runs in taken.items()}

        for r in range(1, rounds + 1):
            label = f"round {r}/{rounds}"
            for i, mode in enumerate(MODES):
                order = rotated(paths, r + i)
                attempts = [turn(order, mode, label)]
                shares = [steal_of(attempts[0])]
                while len(attempts) <= TURN_REDOS and (why := stolen_from(shares[-1])):
                    say(f"{label}: {mode} again: {why}")
                    attempts.append(turn(order, mode, label))
                    shares.append(steal_of(attempts[-1]))
                kept = kept_turn(shares)
                for n, dropped in enumerate(attempts):
                    if n != kept:
                        runs = {path: run._asdict() for path, run in dropped.items()}
                        reason = stolen_from(shares[n])
                        redone.append({"round": r, "mode": mode, "why": reason, "runs": runs})
                if kept != len(attempts) - 1:
                    say(f"{label}: {mode}: all over the limit, the least stolen kept")
                for path, run in attempts[kept].items():
                    tps[mode][path].append(run.tps)
                    sliced[mode][path].append(run.slices)
                    steal[mode][path].append(run.steal)
                    if run.cpu is not None:
                        cpu[mode][path].append(run.cpu)
    medians = {m: {p: statistics.median(v) for p, v in paths.items()} for m, paths in tps.items()}
    cpu_medians = {
        m: {p: round(statistics.median(v), 1) for p, v in paths.items()} for m, paths in cpu.items()
    }
    return {
        "benchmark": "pg",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {
            "seconds": seconds,
            "clients": clients,
            "rounds": rounds,
            "slices": slices,
            "slice_seconds": length,
            "scale": scale_for(clients),
            "proxy_core": PROXY_CORE,
            "load_core": LOAD_CORE,
        },
        "tps": medians,
        "ratios_to_haproxy": (
            {m: round(v["dbproxy"] / v["haproxy"], 3) for m, v in medians.items()}
            if {"dbproxy", "haproxy"} <= set(paths)
            else {}
        ),
        "cpu_us_per_transaction": cpu_medians,
        "rounds": tps,
        "rounds_cpu_us_per_transaction": cpu,
        "rounds_steal_percent": steal,
        "rounds_slices_tps": sliced,
        "redone_turns": redone,
    }


def table(result: dict[str, Any]) -> str:
    paths = list(next(iter(result["tps"].values())))
    proxies = [p for p in paths if p != "direct"]
    names = {"direct": "direct", "haproxy": "HAProxy", "dbproxy": "dbproxy"}
    ratios = result["ratios_to_haproxy"]
    header = ["mode", *(f"{names[p]} tps" for p in paths)]
    header += ["dbproxy / HAProxy"] if ratios else []
    header += [f"{names[p]} CPU µs/tx" for p in proxies]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for mode, v in result["tps"].items():
        cells = [mode, *(f"{v[p]:,.0f}" for p in paths)]
        cells += [f"{ratios[mode]:.2f}"] if ratios else []
        cells += [f"{result['cpu_us_per_transaction'][mode][p]:.1f}" for p in proxies]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
