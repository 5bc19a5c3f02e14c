"""python -m bench [--quick] [--profile python|classic] [--out DIR]   (the comparison)
python -m bench http|pg [--seconds S] [--rounds R] [--out FILE] ...   (one proxy kind)
python -m bench pg --pooling [--case C]   (pooled listeners beside pgbouncer)
python -m bench pg --fuzz N [--seed S] [--out FILE]   (first packets: dbproxy against Postgres)
python -m bench edge [--fuzz N [--seed S]] [--out FILE]   (hostile HTTP inputs: lb, nginx, HAProxy)
python -m bench tls [--case C] [--proxy P]   (TLS termination: lb, nginx, HAProxy)
python -m bench gray [--scenario S] [--proxy P] [--out FILE]   (gray failures, a crowd)
python -m bench surge [--out FILE]  (4,096 connections at once: lb, nginx, HAProxy)
python -m bench ryw [--pairs N] [--out FILE]  (a user read back at once, both profiles)"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .compare import PROFILES, Plan, run_compare
from .edge import run_edge
from .edge import table as edge_table
from .features import features_table, run_features
from .fuzz import run_fuzz
from .fuzz import table as fuzz_table
from .gray import PROXIES as GRAY_PROXIES
from .gray import SCENARIOS as GRAY_SCENARIOS
from .gray import run_gray
from .gray import table as gray_table
from .http import PROXIES, run_http_suite, suite_table
from .pg import run_pg
from .pg import table as pg_table
from .pgfuzz import run_pg_fuzz_stack
from .pgfuzz import table as pgfuzz_table
from .pgpool import CASES as POOL_CASES
from .pgpool import run_pool
from .pgpool import table as pool_table
from .pgtls import run_pg_tls
from .pgtls import table as pg_tls_table
from .procs import BenchError
from .ryw import run_ryw
from .ryw import table as ryw_table
from .surge import run_surge
from .surge import table as surge_table
from .tls import CASES as TLS_CASES
from .tls import PROXIES as TLS_PROXIES
from .tls import run_tls
from .tls import table as tls_table
from .tlsedge import run_tls_edge
from .tlsedge import table as tls_edge_table

# Where a run goes unless told (--out): not tracked by git. The reference run in
# bench/results/ is committed on purpose, with --out.
RUNS = Path(__file__).resolve().parent / "runs"


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Python proxies against nginx and HAProxy."
    )
    p.add_argument(
        "--quick", action="store_true", help="about two minutes in all (default: a full run)"
    )
    p.add_argument("--profile", choices=PROFILES, help="run one side only (default: both)")
    p.add_argument(
        "--out",
        type=Path,
        help="directory of results.json, REPORT.md and the charts "
        "(default bench/runs/<timestamp>/, not tracked by git)",
    )
    sub = p.add_subparsers(dest="command")
    http = sub.add_parser(
        "http", help="lb vs nginx vs HAProxy throughput (needs wrk, nginx, haproxy)"
    )
    http.add_argument(
        "--seconds", type=float, default=10.0, help="length of each measured run (default 10)"
    )
    http.add_argument(
        "--rounds", type=int, default=3, help="runs per proxy, median kept (default 3)"
    )
    http.add_argument(
        "--proxy",
        action="append",
        choices=PROXIES,
        help="only these (default: all; bare-relay is a reference point)",
    )
    http.add_argument(
        "--only",
        choices=("proxies", "features"),
        help="proxies: the proxies at two sizes and two workers; features: lb's and nginx's "
        "routes and access log against their own plain case (default: both)",
    )
    http.add_argument("--out", type=Path, help="JSON file (default bench/runs/http-<time>.json)")
    pg = sub.add_parser(
        "pg", help="pgbench direct vs HAProxy vs dbproxy (needs haproxy, postgresql-15)"
    )
    pg.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="each path's time per mode and round, run in 2 s slices taken in turn (default 10)",
    )
    pg.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    pg.add_argument(
        "--rounds", type=int, default=1, help="runs per path and mode, median kept (default 1)"
    )
    _fuzz_arguments(pg, "first-packet cases through dbproxy and to Postgres (bench/pgfuzz.py)")
    pg.add_argument(
        "--pooling",
        action="store_true",
        help="dbproxy's pooled listeners beside pgbouncer (bench/pgpool.py)",
    )
    pg.add_argument(
        "--case",
        action="append",
        choices=tuple(POOL_CASES),
        help="with --pooling: only this case (repeat)",
    )
    pg.add_argument("--out", type=Path, help="JSON file (default bench/runs/pg-<time>.json)")
    edge = sub.add_parser(
        "edge", help="hostile and odd HTTP/1.1 inputs through lb, nginx and HAProxy"
    )
    _fuzz_arguments(edge, "mutations of request framing instead of the 48 inputs (bench/fuzz.py)")
    edge.add_argument(
        "--only",
        choices=("http", "tls"),
        help="http: the 48 HTTP inputs; tls: hostile handshakes at the TLS listeners "
        "(bench/tlsedge.py); default both",
    )
    edge.add_argument("--out", type=Path, help="JSON file (default bench/runs/edge-<time>.json)")
    gray = sub.add_parser(
        "gray", help="gray failures (frozen, slow, failing fast upstreams) and a crowd of 4,096"
    )
    gray.add_argument(
        "--scenario",
        action="append",
        choices=[s.name for s in GRAY_SCENARIOS],
        help="only this scenario (repeatable; default: all)",
    )
    gray.add_argument("--proxy", action="append", choices=GRAY_PROXIES, help="only this proxy")
    gray.add_argument("--out", type=Path, help="JSON file (default bench/runs/gray-<time>.json)")
    surge = sub.add_parser(
        "surge", help="4,096 keep-alive connections at once to two nginx upstreams, 5 runs"
    )
    surge.add_argument("--out", type=Path, help="JSON file (default bench/runs/surge-<time>.json)")
    tls = sub.add_parser(
        "tls", help="lb's TLS listener vs nginx's and HAProxy's (keep-alive and handshakes)"
    )
    tls.add_argument("--seconds", type=float, default=10.0, help="each measured run (default 10)")
    tls.add_argument("--rounds", type=int, default=3, help="runs per proxy, median kept")
    tls.add_argument("--proxy", action="append", choices=TLS_PROXIES, help="only these")
    tls.add_argument(
        "--case", action="append", choices=[c.name for c in TLS_CASES], help="only this case"
    )
    tls.add_argument(
        "--only",
        choices=("http", "pg"),
        help="http: lb, nginx, HAProxy; pg: pgbench through dbproxy terminating TLS and "
        "HAProxy passing it (bench/pgtls.py); default http",
    )
    tls.add_argument("--out", type=Path, help="JSON file (default bench/runs/tls-<time>.json)")
    ryw = sub.add_parser("ryw", help="register, then read back at once, on each profile's stack")
    ryw.add_argument("--pairs", type=int, default=2_000, help="pairs each way (default 2,000)")
    ryw.add_argument("--profile", choices=PROFILES, help="one profile only (default: both)")
    ryw.add_argument("--out", type=Path, help="JSON file (default bench/runs/ryw-<time>.json)")
    args = p.parse_args()

    def say(text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    try:
        if args.command is None:
            out_dir = args.out or RUNS / time.strftime("%Y%m%d-%H%M%S")
            profiles = (args.profile,) if args.profile else PROFILES
            plan = Plan.quick_run(profiles) if args.quick else Plan(profiles)
            result = run_compare(
                plan, out_dir, say, command=" ".join(["python -m bench", *sys.argv[1:]])
            )
            print(Path(out_dir / "REPORT.md").read_text())
            print(f"\nwritten: {out_dir}/ (results.json, REPORT.md, charts)")
            return 0
        if args.command == "http":
            result, parts = {}, []
            if args.only != "features":
                result = run_http_suite(
                    seconds=args.seconds,
                    rounds=args.rounds,
                    proxies=tuple(args.proxy or PROXIES),
                    say=say,
                )
                parts.append(suite_table(result))
            if args.only != "proxies":
                features = run_features(seconds=args.seconds, rounds=args.rounds, say=say)
                result = {**result, "features": features} if result else features
                parts.append(features_table(features))
            shown = "\n\n".join(parts)
        elif args.command == "tls" and args.only == "pg":
            result = run_pg_tls(seconds=args.seconds, rounds=args.rounds, say=say)
            shown = pg_tls_table(result)
        elif args.command == "tls":
            result = run_tls(
                seconds=args.seconds,
                rounds=args.rounds,
                proxies=tuple(args.proxy or TLS_PROXIES),
                say=say,
                cases=tuple(args.case or ()),
            )
            shown = tls_table(result)
        elif args.command == "surge":
            result = run_surge(say=say)
            shown = surge_table(result)
        elif args.command == "gray":
            result = run_gray(
                scenarios=tuple(args.scenario or ()),
                proxies=tuple(args.proxy or GRAY_PROXIES),
                say=say,
            )
            shown = gray_table(result)
        elif args.command == "ryw":
            profiles = (args.profile,) if args.profile else PROFILES
            result = run_ryw(args.pairs, profiles=profiles, say=say)
            shown = ryw_table(result)
        elif args.command == "edge" and args.fuzz:
            result = run_fuzz(args.fuzz, seed=args.seed, say=say)
            shown = fuzz_table(result)
        elif args.command == "edge":
            result, parts = {}, []
            if args.only != "tls":
                result = run_edge(say=say)
                parts.append(edge_table(result))
            if args.only != "http":
                result["tls"] = run_tls_edge(say)
                parts.append(tls_edge_table(result["tls"]))
            shown = "\n\n".join(parts)
        elif args.fuzz:
            result = run_pg_fuzz_stack(args.fuzz, seed=args.seed, say=say)
            shown = pgfuzz_table(result)
        elif args.pooling:
            cases = tuple(args.case or ())
            result = run_pool(seconds=args.seconds, rounds=args.rounds, say=say, cases=cases)
            shown = pool_table(result)
        else:
            result = run_pg(seconds=args.seconds, clients=args.clients, rounds=args.rounds, say=say)
            shown = pg_table(result)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    out = args.out or RUNS / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(shown)
    print(f"\nwritten: {out}")
    return 0


def _fuzz_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--fuzz", type=int, metavar="N", help=f"N seeded {what}")
    parser.add_argument("--seed", type=int, default=26, help="the fuzz's seed (default 26)")


if __name__ == "__main__":
    sys.exit(main())
