"""The seed's drill, live and short, for a person watching: reads flow through the
entry proxy while a backend is killed and started again, then the replica; a
line a second says what was answered, what failed, how slow, and who served.

Part of `python -m stack demo` (so of `make demo`); `python -m bench` runs the
full drill on both profiles and records every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import control
from .state import StackState
from .topology import BACKENDS, REPLICA

RATE = 50.0  # reads a second, sent on time whatever came back (an open loop)


@dataclass
class Second:
    answered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Event:
    at: float  # seconds since the load started
    what: str
    action: Callable[[], Awaitable[object]]


async def user_ids(http: aiohttp.ClientSession, base: str) -> list[str]:
    params = {"first_name": "А", "last_name": "К", "limit": "50"}
    async with http.get(f"{base}/user/search", params=params) as r:
        return [u["id"] for u in await r.json()] or ["00000000-0000-0000-0000-000000000000"]


async def db_sessions(http: aiohttp.ClientSession, admin: str) -> str:
    """dbproxy's sessions per server, or "" (another profile, or no answer)."""
    try:
        async with http.get(f"{admin}/status", timeout=aiohttp.ClientTimeout(total=0.5)) as r:
            status = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return ""
    pools = status.get("pools", {}).get("postgres", [])
    return " · ".join(f"{s['name']} {s['active']} ({s['state']})" for s in pools)


def p99_ms(latencies: list[float]) -> str:
    if not latencies:
        return "    -"
    ordered = sorted(latencies)
    return f"{1000 * ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]:5.0f}"


async def run(state_dir: Path, base: str, say: Callable[[str], None]) -> None:
    state = StackState.load(state_dir)
    assert state is not None
    topology = state.topology
    backend = BACKENDS[0]
    admin = f"http://127.0.0.1:{topology.ports.dbproxy_admin}"

    async def kill(name: str) -> None:
        await asyncio.to_thread(control.kill, state_dir, name)

    events = [
        Event(4, f"kill -9 {backend}", lambda: kill(backend)),
        Event(10, f"start {backend}", lambda: control.start(state_dir, backend)),
        Event(16, f"kill -9 {REPLICA}", lambda: kill(REPLICA)),
        Event(24, f"start {REPLICA}", lambda: control.start(state_dir, REPLICA)),
    ]
    seconds = 32
    timeline: dict[int, Second] = {}
    notes: dict[int, list[str]] = {}
    say("")
    say(f"the drill, live: {RATE:.0f} reads/s through {base} for {seconds} s")
    say("   t  answered  failed  p99 ms  served by                      db sessions (dbproxy)")
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        ids = await user_ids(http, base)
        started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()

        async def read(n: int) -> None:
            sent = time.monotonic()
            second = timeline.setdefault(int(sent - started), Second())
            try:
                async with http.get(f"{base}/user/get/{ids[n % len(ids)]}") as r:
                    await r.read()
                    ok, served = r.status == 200, r.headers.get("X-Served-By", "?")
            except (aiohttp.ClientError, TimeoutError, OSError):
                ok, served = False, "-"
            if ok:
                second.answered += 1
                second.latencies.append(time.monotonic() - sent)
                second.served[served] += 1
            else:
                second.failed += 1

        async def act(event: Event) -> None:
            await asyncio.sleep(max(0.0, event.at - (time.monotonic() - started)))
            begun = time.monotonic()
            await event.action()
            took = time.monotonic() - begun
            notes.setdefault(int(event.at), []).append(
                f"{event.what} (ready in {took:.1f} s)"
                if event.what.startswith("start")
                else event.what
            )

        async def report() -> None:
            for t in range(1, seconds + 1):
                await asyncio.sleep(max(0.0, t - (time.monotonic() - started)))
                s = timeline.get(t - 1, Second())
                served = " · ".join(
                    f"{k.rsplit('-', 1)[-1]}:{v}" for k, v in sorted(s.served.items())
                )
                db = await db_sessions(http, admin)
                counts = f"{t - 1:4d}  {s.answered:8d}  {s.failed:6d}  {p99_ms(s.latencies)}"
                line = f"{counts}   {served:30s} {db}"
                say(line + "".join(f"   <- {n}" for n in notes.get(t - 1, [])))

        actions = [asyncio.create_task(act(e)) for e in events]
        reporter = asyncio.create_task(report())
        for n in itertools.count():
            due = started + n / RATE
            if due - started >= seconds:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(read(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*actions)
        if tasks:
            await asyncio.wait(tasks)
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    total = sum(s.answered + s.failed for s in timeline.values())
    failed = sum(s.failed for s in timeline.values())
    say(f"{total} reads, {failed} failed, while a backend and then the replica died and came back")
