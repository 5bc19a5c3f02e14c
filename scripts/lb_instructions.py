"""lb's own work per request as a count of instructions: the steady yardstick.

    .venv/bin/python scripts/lb_instructions.py [--profile] [-- --config lb.toml --target /path]

Runs scripts/lb_cost.py under valgrind's cachegrind at two lengths and divides
the difference by the extra requests, so start-up and imports fall out. The
count is the same on every run, where a timing on a shared VM swings by a
tenth; it also prints the simulated first-level cache misses (instruction and
data). ``--profile`` runs callgrind the same way and prints the functions with
the most instructions per request, lb's own with what they call.

Needs valgrind (`apt-get install valgrind`); a developer's tool, as
scripts/lb_cost.py is: nothing in the tests or the benchmarks uses it.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COST = ROOT / "scripts" / "lb_cost.py"
SHORT, LONG = 5_000, 25_000
COUNTS = {"I   refs": "instructions", "I1  misses": "I1 misses", "D1  misses": "D1 misses"}
# callgrind_annotate's line: count, (percent), file:function [object]
LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?)(?:'\d+)? \[(.*)\]\s*$")


def valgrind(tool: str, requests: int, out: Path, cost_args: list[str]) -> str:
    argv = [
        "valgrind",
        f"--tool={tool}",
        f"--{tool}-out-file={out}",
        *(["--cache-sim=yes"] if tool == "cachegrind" else []),
        sys.executable,
        str(COST),
        "--requests",
        str(requests),
        *cost_args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stderr


def counts(cost_args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for n in (SHORT, LONG):
            text = valgrind("cachegrind", n, Path(tmp) / f"cg-{n}", cost_args)
            found = {}
            for key, name in COUNTS.items():
                match = re.search(re.escape(key) + r":\s+([\d,]+)", text)
                if match is None:
                    raise SystemExit(f"no {key!r} in valgrind's report")
                found[name] = int(match.group(1).replace(",", ""))
            runs.append(found)
    return {name: (runs[1][name] - runs[0][name]) / (LONG - SHORT) for name in COUNTS.values()}


def by_function(out: Path, inclusive: bool) -> collections.Counter[str]:
    text = subprocess.run(
        [
            "callgrind_annotate",
            "--threshold=100",
            f"--inclusive={'yes' if inclusive else 'no'}",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            found[match.group(2).split(":")[-1]] += int(match.group(1).replace(",", ""))
    return found


def profile(top: int, cost_args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outs = {n: Path(tmp) / f"callgrind-{n}" for n in (SHORT, LONG)}
        for n, out in outs.items():
            valgrind("callgrind", n, out, cost_args)
        for inclusive, title in ((False, "self"), (True, "with what it calls (lb's own)")):
            short, long = (by_function(outs[n], inclusive) for n in (SHORT, LONG))
            rows = {f: (long[f] - short.get(f, 0)) / (LONG - SHORT) for f in long}
            if inclusive:
                rows = {f[len("CPyDef_") :]: v for f, v in rows.items() if f.startswith("CPyDef_")}
            print(f"-- instructions per request, {title}")
            for name, value in sorted(rows.items(), key=lambda kv: -kv[1])[:top]:
                print(f"{value:9.0f}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/lb_instructions.py")
    p.add_argument("--profile", action="store_true", help="by function, with callgrind")
    p.add_argument("--top", type=int, default=30)
    p.add_argument(
        "cost_args", nargs="*", help="after --: scripts/lb_cost.py's --config FILE --target PATH"
    )
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    for name, value in counts(args.cost_args).items():
        print(f"{name} per request: {value:,.0f}")
    if args.profile:
        profile(args.top, args.cost_args)


if __name__ == "__main__":
    main()
