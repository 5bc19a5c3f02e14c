"""lb's balancing methods side by side on the users stack: one local python
stack, wrk through the entry (as `python -m bench` measures it), the method of
the stack's lb switched by SIGHUP between runs, in alternating rounds.

    .venv/bin/python scripts/entry_methods.py [--rounds 3] [--seconds 8] [round_robin peak_ewma]

A developer's tool (what chose lb's default method), not a benchmark of record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.drill import seeded_user_ids
from bench.entry import measure_entry, proxy_pids
from bench.stackrun import local_stack


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/entry_methods.py")
    p.add_argument("methods", nargs="*", default=["round_robin", "peak_ewma"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_stack(Path(tmp), profile="python", users=2000) as stack,
    ):
        conf = stack.state_dir / "lb" / "lb.toml"
        state = json.loads((stack.state_dir / "state.json").read_text())
        lb_pid = state["processes"]["lb"]["pid"]
        pids = proxy_pids(stack.state_dir, "python")
        path = f"/user/get/{asyncio.run(seeded_user_ids(stack.entry, count=1))[0]}"
        print("method req/s p50_ms p99_ms errors proxies_cpu_us_per_request")
        for _ in range(args.rounds):
            for method in args.methods:
                text = re.sub(
                    r'^method = "\w+"', f'method = "{method}"', conf.read_text(), flags=re.M
                )
                conf.write_text(text)
                os.kill(lb_pid, signal.SIGHUP)
                time.sleep(1.5)  # the workers have read it
                m = measure_entry(stack.ports.entry, path, pids, seconds=args.seconds)
                print(
                    method,
                    round(m.rps),
                    m.p50_ms,
                    m.p99_ms,
                    m.errors,
                    round(m.proxy_cpu_us_per_request, 1),
                    flush=True,
                )


if __name__ == "__main__":
    main()
