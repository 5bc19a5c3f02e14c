"""psycopg's own test suite straight to Postgres and through dbproxy's pooled
listeners (session and transaction), side by side, on a throwaway cluster.

    python scripts/psycopg_suite.py --source PSYCOPG_CHECKOUT --python VENV/bin/python \
        [--mode direct --mode session --mode transaction] [--tests "tests/test_copy.py ..."]

PSYCOPG_CHECKOUT: psycopg's repository at the tag of the installed driver
(`git archive 3.3.4`); VENV: a virtualenv with that psycopg[binary], pytest,
anyio and the suite's other needs. The pool package, CockroachDB's tests and
the typing tests (mypy) are left out. Each test gets 30 s (SIGALRM, re-raised
every 5 s as a BaseException a test cannot swallow): in transaction mode a
LISTEN waits for ever. The three runs go at once, each on its own database;
each writes FAILED lines to OUT/psycopg-MODE.out and a JUnit file beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.lbctl import stop, wait_port  # noqa: E402
from tests.pgcluster import cluster  # noqa: E402
from tests.stackctl import free_ports  # noqa: E402

MODES = ("direct", "session", "transaction")

ALARM_PLUGIN = """
import signal
import pytest

LIMIT = 30


class TestTimeout(BaseException):
    pass


def _fire(signum, frame):
    raise TestTimeout(f"test ran past {LIMIT} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, LIMIT, 5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="psycopg's checkout")
    p.add_argument("--python", required=True, help="the interpreter with psycopg and pytest")
    p.add_argument("--mode", action="append", choices=MODES, help="default: all three")
    p.add_argument("--tests", default="tests", help="what pytest runs (default: tests)")
    p.add_argument("--out", type=Path, default=Path("."), help="where the outputs go")
    args = p.parse_args()
    modes = tuple(args.mode or MODES)
    (args.source / "balance_alarm.py").write_text(ALARM_PLUGIN)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="psycopg-suite-") as tmp:
        databases = [f"CREATE DATABASE psycopg_test_{m}" for m in modes]
        with cluster(Path(tmp), *databases) as pg:
            proxies: dict[str, subprocess.Popen[bytes]] = {}
            runs: dict[str, subprocess.Popen[bytes]] = {}
            try:
                ports = {"direct": pg.port}
                for mode in ("session", "transaction"):
                    if mode not in modes:
                        continue
                    port, other, admin = free_ports(3)
                    log = open(args.out / f"dbproxy-{mode}.log", "wb")  # noqa: SIM115
                    proxies[mode] = subprocess.Popen(
                        [
                            sys.executable,
                            *("-m", "dbproxy", "--listen", f"rw=127.0.0.1:{port}"),
                            *("--listen", f"any=127.0.0.1:{other}"),
                            *("--server", f"pg=127.0.0.1:{pg.port}"),
                            *("--admin", f"127.0.0.1:{admin}"),
                            *("--check-user", "postgres", "--check-database", "postgres"),
                            *("--pool-mode", mode, "--pool-size", "20", "--auth-type", "trust"),
                        ],
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    wait_port(port, proxies[mode])
                    ports[mode] = port
                time.sleep(1)  # the checks have found the server's role
                for mode in modes:
                    dsn = f"host=127.0.0.1 port={ports[mode]} user=postgres"
                    dsn += f" dbname=psycopg_test_{mode}"
                    out = open(args.out / f"psycopg-{mode}.out", "w")  # noqa: SIM115
                    runs[mode] = subprocess.Popen(
                        [
                            args.python,
                            *("-m", "pytest", *args.tests.split(), "-q", "-ra"),
                            *("-p", "no:randomly", "-p", "balance_alarm"),
                            *("-o", f"cache_dir=.pytest_cache_{mode}"),
                            *("--ignore=tests/pool", "--ignore=tests/crdb"),
                            *("--ignore=tests/test_typing.py", "--ignore=tests/scripts"),
                            f"--test-dsn={dsn}",
                            f"--junitxml={args.out / f'psycopg-{mode}.xml'}",
                        ],
                        cwd=args.source,
                        env={**os.environ, "PYTHONPATH": str(args.source)},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                for mode, run in runs.items():
                    run.wait(timeout=5400)
                    print(mode, (args.out / f"psycopg-{mode}.out").read_text().splitlines()[-1])
            finally:
                for proc in [*runs.values(), *proxies.values()]:
                    stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
