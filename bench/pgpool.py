"""`python -m bench pg --pooling`: dbproxy's pooled listeners beside pgbouncer.

One throwaway cluster with max_connections 50 (bench/pg.py's stack has 200), a
pgbench database in it, and three cases, each path's slices taken in turn as
bench/pg.py takes them (proxies pinned to core 0, pgbench to core 1):

- connect: ``-S -C``, 16 clients: a connection per transaction, which a pooler
  answers with an already-open server connection (session pooling);
- crowd: ``-S -C``, 150 clients on 2 pgbench threads against max_connections
  50: more clients than the server has slots (transaction pooling; HAProxy and
  a relay for contrast, whose clients fail);
- select-only: ``-S``, 16 long-lived clients (session pooling).

pgbouncer (Debian's) and dbproxy both trust the client (pg_hba trusts the
superuser on loopback) and log in to Postgres without a password; both have
pool size 20. The ratio that counts is dbproxy's tps over pgbouncer's; the
crowd's clients that failed (pgbench's aborted clients) are reported too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import asyncpg

from stack import postgres as pg
from stack.control import pg_root_for

from .pg import (
    LOAD_CORE,
    PROXY_CORE,
    _pg_bin,
    _superuser,
    dbproxy_argv,
    haproxy_argv,
    interleaved,
)
from .procs import BenchError, free_port, machine, require, rotated, running

POOL_SIZE: Final = 20
MAX_CONNECTIONS: Final = 50


class Case(NamedTuple):
    flags: list[str]
    clients: int
    threads: int
    # path name -> (proxy, pool mode)
    paths: dict[str, tuple[str, str]]


CASES: Final = {
    "connect": Case(
        ["-S", "-C"],
        16,
        1,
        {"pgbouncer": ("pgbouncer", "session"), "dbproxy": ("dbproxy", "session")},
    ),
    "crowd": Case(
        ["-S", "-C"],
        150,
        2,
        {
            "pgbouncer": ("pgbouncer", "transaction"),
            "dbproxy": ("dbproxy", "transaction"),
            "haproxy": ("haproxy", ""),
            "dbproxy relay": ("dbproxy", "none"),
        },
    ),
    "select-only": Case(
        ["-S"],
        16,
        1,
        {"pgbouncer": ("pgbouncer", "session"), "dbproxy": ("dbproxy", "session")},
    ),
}

PGBOUNCER_INI = """
[databases]
* = host=127.0.0.1 port={master}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {userlist}
pool_mode = {mode}
default_pool_size = {size}
max_client_conn = 2000
logfile = {log}
ignore_startup_parameters = extra_float_digits
"""


class Result(NamedTuple):
    tps: float
    aborted: int  # clients pgbench reported aborted (their connect or query failed)


def pgbench(port: int, case: Case, seconds: int, env: dict[str, str] | None = None) -> Result:
    """``case`` for ``seconds`` through ``port``; ``env``: libpq's (PGSSLMODE ...)."""
    command = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        _pg_bin("pgbench"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        "postgres",
        "-n",
        "-c",
        str(case.clients),
        "-j",
        str(case.threads),
        "-T",
        str(seconds),
        *case.flags,
        "bench",
    ]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env=None if env is None else {**os.environ, **env},
    )
    tps = re.search(r"^tps = ([0-9.]+)", out.stdout, re.MULTILINE)
    if tps is None:
        # every client aborted: no tps line; what pgbench said is the result
        if "aborted" in out.stderr or "aborted" in out.stdout:
            return Result(0.0, case.clients)
        raise BenchError(f"pgbench failed: {out.stderr.strip()[-400:]}")
    aborted = len(re.findall(r"client \d+ aborted", out.stderr))
    return Result(float(tps.group(1)), aborted)


@contextlib.contextmanager
def cluster(work: Path, tls: tuple[Path, Path] | None = None) -> Iterator[int]:
    """A throwaway cluster of ``MAX_CONNECTIONS``; ``tls``: its (certificate, key)
    and ``ssl = on``."""
    bindir, user = pg.find_bindir(), pg.run_as()
    root = pg_root_for(work / "pg")
    datadir = root / "data"
    pg.initdb(bindir, datadir, user)
    port = free_port()
    pg.configure(datadir, port, publisher=False)
    with open(datadir / "balance.conf", "a") as conf:
        conf.write(f"max_connections = {MAX_CONNECTIONS}\n")
        if tls is not None:
            owner = datadir.stat()
            for source, name in zip(tls, ("server.crt", "server.key"), strict=True):
                shutil.copy(source, datadir / name)
                os.chown(datadir / name, owner.st_uid, owner.st_gid)
                (datadir / name).chmod(0o600)
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    argv = pg.server_argv(bindir, datadir)
    with running(
        argv if user is None else ["runuser", "-u", user, "--", *argv],
        core=None,
        port=port,
        log=work / "postgres.log",
    ):
        try:
            _ready(port)
            yield port
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _ready(port: int, timeout: float = 30.0) -> None:
    """Until the cluster takes queries (it listens before it is out of startup)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _superuser(port, "SELECT 1")
            return
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise BenchError("the pgbench cluster did not start") from None
            time.sleep(0.2)


@contextlib.contextmanager
def _proxy(kind: str, mode: str, master: int, work: Path) -> Iterator[int]:
    port = free_port()
    log = work / f"{kind}-{mode or 'tcp'}.log"
    if kind == "haproxy":
        argv = haproxy_argv(port, master, work)
    elif kind == "pgbouncer":
        # pgbouncer will not run as root: it drops to the cluster's user (-u),
        # which must read its files
        userlist = work / "userlist.txt"
        userlist.write_text('"postgres" ""\n')
        ini = work / f"pgbouncer-{mode}.ini"
        ini.write_text(
            PGBOUNCER_INI.format(
                master=master, port=port, userlist=userlist, mode=mode, size=POOL_SIZE, log=log
            )
        )
        argv = [_pgbouncer(), ini.as_posix()]
        user = pg.run_as()
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (work, userlist, ini):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            argv = [argv[0], "-u", user, argv[1]]
            log = work / f"pgbouncer-{mode}.out"
    else:
        argv = dbproxy_argv(
            port,
            master,
            "--check-user",
            "postgres",
            "--pool-mode",
            mode,
            "--pool-size",
            str(POOL_SIZE),
            "--auth-type",
            "trust",
        )
    with running(argv, core=PROXY_CORE, port=port, log=log):
        yield port


def _pgbouncer() -> str:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and Path(candidate).exists():
            return candidate
    raise BenchError("pgbouncer not found; `make setup` installs it")


def pgbench_tables(master: int) -> None:
    """The database ``bench`` with pgbench's tables at scale 16."""
    _superuser(master, "CREATE DATABASE bench")
    init = ["-i", "-q", "-s", "16", "bench"]
    subprocess.run(
        [_pg_bin("pgbench"), "-h", "127.0.0.1", "-p", str(master), "-U", "postgres", *init],
        check=True,
        capture_output=True,
        timeout=300,
    )


def slicing(seconds: float) -> tuple[int, int]:
    """A path's time of a round in 2 s slices: (slices, seconds each)."""
    slices = max(1, int(seconds // 2))
    return slices, max(1, round(seconds / slices))


Proxies = Callable[[str, str, int, Path], contextlib.AbstractContextManager[int]]
Tps = dict[str, dict[str, list[float]]]


def run_cases(
    cases: dict[str, Case],
    master: int,
    work: Path,
    seconds: float,
    rounds: int,
    say: Callable[[str], None],
    proxy: Proxies,
    env: dict[str, str] | None = None,
) -> tuple[Tps, dict[str, dict[str, list[int]]]]:
    """Each case's paths in turn, ``rounds`` times: a round starts each path's
    proxy afresh (``proxy(kind, mode, master, work)`` gives its port) and takes
    their slices interleaved. Per case and path: each round's tps, and the
    clients that aborted."""
    slices, length = slicing(seconds)
    tps: Tps = {c: {p: [] for p in cases[c].paths} for c in cases}
    aborted: dict[str, dict[str, list[int]]] = {c: {p: [] for p in cases[c].paths} for c in cases}
    for r in range(1, rounds + 1):
        for i, (name, case) in enumerate(cases.items()):
            order = rotated(tuple(case.paths), r + i)
            say(f"round {r}/{rounds}: {name}, {slices} slices of {length}s: {order}")
            taken: dict[str, list[Result]] = {p: [] for p in order}
            with contextlib.ExitStack() as up:
                ports = {p: up.enter_context(proxy(*case.paths[p], master, work)) for p in order}
                for path in interleaved(order, slices):
                    taken[path].append(pgbench(ports[path], case, length, env))
                    time.sleep(0.2)  # the sessions of one path gone before the next
            for path, results in taken.items():
                tps[name][path].append(statistics.fmean(x.tps for x in results))
                aborted[name][path].append(sum(x.aborted for x in results))
    return tps, aborted


def medians_of(tps: Tps) -> dict[str, dict[str, float]]:
    return {c: {p: round(statistics.median(v), 1) for p, v in t.items()} for c, t in tps.items()}


def timing(seconds: float, rounds: int) -> dict[str, Any]:
    """How long a run's paths ran: what every result's settings begin with."""
    slices, length = slicing(seconds)
    return {"seconds": seconds, "rounds": rounds, "slices": slices, "slice_seconds": length}


def head(benchmark: str) -> dict[str, Any]:
    """What a result file starts with: the benchmark, when, where."""
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine()}


def run_pool(
    *, seconds: float, rounds: int, say: Callable[[str], None], cases: tuple[str, ...] = ()
) -> dict[str, Any]:
    require("taskset", "haproxy")
    _pgbouncer()
    chosen = {name: CASES[name] for name in (cases or tuple(CASES))}
    with tempfile.TemporaryDirectory(prefix="bench-pgpool-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        say(f"a cluster with max_connections {MAX_CONNECTIONS}; pgbench -i -s 16")
        with cluster(work) as master:
            pgbench_tables(master)
            tps, aborted = run_cases(chosen, master, work, seconds, rounds, say, _proxy)
    medians = medians_of(tps)
    return {
        **head("pg-pooling"),
        "settings": {
            **timing(seconds, rounds),
            "pool_size": POOL_SIZE,
            "max_connections": MAX_CONNECTIONS,
            "cases": {
                name: {
                    "pgbench": [*case.flags, "-c", str(case.clients), "-j", str(case.threads)],
                    "paths": {p: f"{k} {m}".strip() for p, (k, m) in case.paths.items()},
                }
                for name, case in chosen.items()
            },
        },
        "tps": medians,
        "aborted_clients": {c: {p: sum(v) for p, v in a.items()} for c, a in aborted.items()},
        "ratios_to_pgbouncer": {
            c: round(t["dbproxy"] / t["pgbouncer"], 3) if t.get("pgbouncer") else None
            for c, t in medians.items()
        },
        "rounds": tps,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| case | path | tps | clients aborted | / pgbouncer |",
        "|---|---|---:|---:|---:|",
    ]
    for case, paths in result["tps"].items():
        base = paths.get("pgbouncer")
        for path, value in paths.items():
            mode = result["settings"]["cases"][case]["paths"][path]
            ratio = f"{value / base:.2f}" if base else "-"
            failed = result["aborted_clients"][case][path]
            lines.append(f"| {case} | {path} ({mode}) | {value:,.0f} | {failed} | {ratio} |")
    return "\n".join(lines)
