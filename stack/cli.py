"""python -m stack up|down|status|kill|start|freeze|thaw|demo"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import control, demo
from .errors import StackError
from .topology import PROFILES, Credentials, Ports, Topology, work_dir


def _port_override(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT, got '{text}'")
    return name, int(value)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ["BALANCE_STACK_DIR"])
        if "BALANCE_STACK_DIR" in os.environ
        else None,
        help="where data dirs, logs and PIDs live (default: .stack/ in the repository, "
        "or $BALANCE_STACK_DIR)",
    )
    p = argparse.ArgumentParser(
        prog="python -m stack", description="The whole topology as local processes."
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start everything and wait until it serves")
    up.add_argument(
        "--proxies",
        choices=PROFILES,
        default="none",
        help="which proxies stand in front: none, python (lb + dbproxy), classic (nginx + HAProxy)",
    )
    up.add_argument(
        "--users", type=int, default=100_000, help="synthetic users to seed (default 100000)"
    )
    up.add_argument("--seed", type=int, default=1, help="random seed of the synthetic users")
    up.add_argument(
        "--port",
        type=_port_override,
        action="append",
        default=[],
        metavar="NAME=PORT",
        help=f"override a port; names: {', '.join(Ports.names())}",
    )

    down = sub.add_parser("down", parents=[common], help="stop everything")
    down.add_argument("--purge", action="store_true", help="also delete the clusters' data")
    sub.add_parser("status", parents=[common], help="show each service, its address, PID and state")
    for name, text in (
        ("kill", "SIGKILL a service and all its processes, as `docker kill`"),
        ("start", "start a stopped or killed service again"),
        ("freeze", "SIGSTOP a service and all its processes, as `docker pause`"),
        ("thaw", "SIGCONT a frozen service, as `docker unpause`"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("name")
    sub.add_parser(
        "demo",
        parents=[common],
        help="register, log in, fetch and search through the running stack",
    )
    return p


def _table(rows: Sequence[control.ServiceStatus]) -> str:
    header = ("SERVICE", "ADDRESS", "PID", "STATE")
    cells = [header] + [(r.name, r.address, str(r.pid or "-"), r.state) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells
    )


def _say(text: str) -> None:
    print(text, flush=True)


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir = (args.state_dir or work_dir()).resolve()
    if args.command == "up":
        if args.users < 0:
            raise StackError("--users must be 0 or more")
        topology = Topology(
            state_dir=state_dir,
            pg_root=control.pg_root_for(state_dir),
            ports=Ports().with_overrides(dict(args.port)),
            proxies=args.proxies,
            users=args.users,
            seed=args.seed,
            credentials=Credentials.from_env(os.environ),
        )
        asyncio.run(control.up(topology, _say))
        print(_table(control.status(state_dir)))
        print("\nstop everything with: python -m stack down")
    elif args.command == "down":
        count = control.down(state_dir, _say, purge=args.purge)
        print(f"stack down ({count} service(s) stopped)" if count else "nothing was running")
    elif args.command == "status":
        rows = control.status(state_dir)
        print(_table(rows) if rows else "no stack; start one with `python -m stack up`")
    elif args.command == "kill":
        pid = control.kill(state_dir, args.name)
        print(f"killed {args.name} (pid {pid}) and all its processes")
    elif args.command == "start":
        pid = asyncio.run(control.start(state_dir, args.name))
        print(f"started {args.name} (pid {pid})")
    elif args.command == "freeze":
        pid = control.freeze(state_dir, args.name)
        print(f"froze {args.name} (pid {pid}) and all its processes; `stack thaw {args.name}`")
    elif args.command == "thaw":
        pid = control.thaw(state_dir, args.name)
        print(f"thawed {args.name} (pid {pid})")
    elif args.command == "demo":
        asyncio.run(demo.run(state_dir, _say))
    return 0


def main() -> None:
    try:
        code = run()
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
