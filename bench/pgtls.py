"""`python -m bench tls --only pg`: TLS from pgbench to Postgres through dbproxy's
`ssl = "terminate"` and through HAProxy, which can only pass TLS through.

One throwaway cluster with `ssl = on` and the run's certificate (as bench/pgpool.py
makes it: max_connections 50, pgbench's tables at scale 16), pgbench with
`PGSSLMODE=require` on core 1, the proxies on core 0, each path's slices taken
in turn as `bench pg` takes them. Paths:

- direct: pgbench to Postgres, which does the TLS;
- haproxy: TCP mode, the TLS end to end (Postgres does it);
- dbproxy: `ssl = "terminate"` relaying (`pool_mode = "none"`), the session
  in clear to the server;
- dbproxy pooled: the same with session pooling.

Two cases: `-S` with 16 long-lived clients, and `-S -C` with 16 (a TLS
handshake and a login per transaction). The ratio that counts is dbproxy's tps
over HAProxy's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from stack.pki import Issued, authority

from .pg import dbproxy_argv, haproxy_argv
from .pgpool import (
    POOL_SIZE,
    Case,
    Proxies,
    cluster,
    head,
    medians_of,
    pgbench_tables,
    run_cases,
    timing,
)
from .procs import free_port, require, running

PATHS: Final = {
    "direct": ("direct", ""),
    "haproxy": ("haproxy", ""),
    "dbproxy": ("dbproxy", "none"),
    "dbproxy pooled": ("dbproxy", "session"),
}
CASES: Final = {
    "select-only": Case(["-S"], 16, 1, dict(PATHS)),
    "connect": Case(["-S", "-C"], 16, 1, dict(PATHS)),
}
PROXY_CORE: Final = 0


def _proxies(cert: Issued) -> Proxies:
    @contextlib.contextmanager
    def start(kind: str, mode: str, master: int, work: Path) -> Iterator[int]:
        if kind == "direct":
            yield master
            return
        port = free_port()
        if kind == "haproxy":
            argv = haproxy_argv(port, master, work)
        else:
            argv = dbproxy_argv(
                port,
                master,
                *("--check-user", "postgres", "--pool-mode", mode),
                *("--pool-size", str(POOL_SIZE), "--auth-type", "trust"),
                *("--ssl", "terminate", "--ssl-cert", str(cert.cert), "--ssl-key", str(cert.key)),
            )
        with running(argv, core=PROXY_CORE, port=port, log=work / f"{kind}-{mode or 'tcp'}.log"):
            yield port

    return start


def run_pg_tls(*, seconds: float, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    require("taskset", "haproxy")
    with tempfile.TemporaryDirectory(prefix="bench-pgtls-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        ca = authority(work / "ca")
        cert = ca.issue(work, "site", ["localhost", "127.0.0.1"])
        say("a cluster with ssl = on; pgbench -i -s 16")
        with cluster(work, (cert.cert, cert.key)) as master:
            pgbench_tables(master)
            tps, aborted = run_cases(
                dict(CASES),
                master,
                work,
                seconds,
                rounds,
                say,
                _proxies(cert),
                env={"PGSSLMODE": "require"},
            )
    medians = medians_of(tps)
    return {
        **head("tls-pg"),
        "settings": {
            **timing(seconds, rounds),
            "sslmode": "require",
            "cases": {name: [*c.flags, "-c", str(c.clients)] for name, c in CASES.items()},
        },
        "tps": medians,
        "aborted_clients": {c: {p: sum(v) for p, v in a.items()} for c, a in aborted.items()},
        "ratios_to_haproxy": {
            c: {p: round(v / t["haproxy"], 3) for p, v in t.items()} for c, t in medians.items()
        },
        "rounds": tps,
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| case | path | tps | clients aborted | ÷ HAProxy |", "|---|---|---:|---:|---:|"]
    for case, paths in result["tps"].items():
        for path, value in paths.items():
            ratio = result["ratios_to_haproxy"][case][path]
            failed = result["aborted_clients"][case][path]
            lines.append(f"| {case} | {path} | {value:,.0f} | {failed} | {ratio:.2f} |")
    return "\n".join(lines)
