"""The seed's failure drill (docs/stack.md): kill -9 and restart each part
under load, then the gray steps: freeze a backend and the replica (SIGSTOP of
every process, as `docker pause`) for FREEZE_SECONDS and thaw them.

A constant-rate (open-loop) load of reads with some writes goes to the entry
port; one request leaves every 1/rate seconds whether or not earlier ones have
answered, so a stall shows as errors and latency instead of silently slowing
the load down. Every request is recorded: when it was sent, how long it took,
its status, and the step of the drill it was sent in. The stack is driven
through its CLI, as a person would (`python -m stack kill|start|freeze|thaw NAME`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from stack.topology import BACKENDS, MASTER, REPLICA

Kind = Literal["get", "search", "register"]
READS: tuple[Kind, ...] = ("get", "search")
# Status of a request that got no HTTP answer (refused, reset, timed out), and of
# one the load generator could not send because too many were still in flight.
NO_ANSWER, NOT_SENT = 0, -1
REPO = Path(__file__).resolve().parent.parent

# One request in ten is a write, two are searches, the rest fetch a user by id.
MIX: tuple[Kind, ...] = (
    "register",
    "search",
    "get",
    "get",
    "search",
    "get",
    "get",
    "get",
    "get",
    "get",
)
SEARCH_PREFIXES = (("А", "К"), ("Е", "С"), ("М", "П"), ("О", "В"))


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    command: str | None = None  # "kill" | "start" | "freeze" | "thaw"
    service: str | None = None
    seconds: float | None = None  # how long the step holds; None: the drill's step_seconds


DATABASES = (MASTER, REPLICA)
BACKEND = BACKENDS[0]
# How long a frozen service stays frozen: as long as a stop-the-world pause that
# hurts, and longer than any check's fall time.
FREEZE_SECONDS = 6.0
STEPS: tuple[Step, ...] = (
    Step("all up"),
    Step("replica killed", "kill", REPLICA),
    Step("replica restarted", "start", REPLICA),
    Step("backend killed", "kill", BACKEND),
    Step("backend restarted", "start", BACKEND),
    Step("master killed", "kill", MASTER),
    Step("master restarted", "start", MASTER),
    Step("backend frozen", "freeze", BACKEND, FREEZE_SECONDS),
    Step("backend thawed", "thaw", BACKEND),
    Step("replica frozen", "freeze", REPLICA, FREEZE_SECONDS),
    Step("replica thawed", "thaw", REPLICA),
)
GRAY_STEPS = frozenset(i for i, s in enumerate(STEPS) if s.command in ("freeze", "thaw"))


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request. Times are seconds since the load started."""

    kind: Kind
    step: int
    sent: float
    latency: float
    status: int
    retry_after: bool
    served_by: str = ""  # the backend that answered (X-Served-By), "" when none did


@dataclass(frozen=True, slots=True)
class StepTiming:
    """When a step's action ran: it begins at `started`, and the service was
    killed, or was back and ready, by `done`."""

    started: float
    done: float
    ended: float


@dataclass
class DrillResult:
    profile: str
    rate: float
    step_seconds: float
    steps: Sequence[Step]
    timings: list[StepTiming] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    # For a database's restart step: when it had the service's sessions again.
    db_back: dict[int, float] = field(default_factory=dict)

    def of_step(
        self, index: int, kinds: Sequence[Kind] = ("get", "search", "register")
    ) -> list[Outcome]:
        return [o for o in self.outcomes if o.step == index and o.kind in kinds]

    def counts(self, index: int, kinds: Sequence[Kind]) -> Counter[int]:
        return Counter(o.status for o in self.of_step(index, kinds))

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "rate": self.rate,
            "step_seconds": self.step_seconds,
            "steps": [
                {
                    "name": s.name,
                    "action": f"{s.command} {s.service}" if s.command else None,
                    "started": round(t.started, 4),
                    "done": round(t.done, 4),
                    "ended": round(t.ended, 4),
                    "reads": _status_keys(self.counts(i, READS)),
                    "writes": _status_keys(self.counts(i, ("register",))),
                }
                for i, (s, t) in enumerate(zip(self.steps, self.timings, strict=True))
            ],
        }


def _status_keys(counter: Counter[int]) -> dict[str, int]:
    return {str(status): n for status, n in sorted(counter.items())}


class StackControl:
    """`python -m stack kill|start|freeze|thaw NAME` on one stack, without blocking the loop."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    async def __call__(self, command: str, service: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stack",
            command,
            service,
            "--state-dir",
            str(self.state_dir),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"`stack {command} {service}` failed:\n{out.decode(errors='replace')}"
            )


class OpenLoopLoad:
    """Sends one request every 1/rate seconds to `entry` and records each outcome."""

    def __init__(
        self,
        entry: str,
        rate: float,
        user_ids: Sequence[str],
        *,
        timeout: float = 5.0,
        max_in_flight: int = 256,
    ) -> None:
        self.entry = entry
        self.rate = rate
        self.user_ids = user_ids
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.outcomes: list[Outcome] = []
        self.step = 0
        self.started = 0.0
        self._in_flight: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            self.started = time.monotonic()
            for n in itertools.count():
                due = n / self.rate
                delay = due - self.now()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
                kind = MIX[n % len(MIX)]
                if len(self._in_flight) >= self.max_in_flight:
                    self.outcomes.append(Outcome(kind, self.step, self.now(), 0.0, NOT_SENT, False))
                    continue
                task = asyncio.create_task(self._one(http, kind, n))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if self._in_flight:
                await asyncio.wait(self._in_flight)

    async def _one(self, http: aiohttp.ClientSession, kind: Kind, n: int) -> None:
        step, sent = self.step, self.now()
        status, retry_after, served_by = NO_ANSWER, False, ""
        try:
            async with self._request(http, kind, n) as response:
                await response.read()
                status, retry_after = response.status, "Retry-After" in response.headers
                served_by = response.headers.get("X-Served-By", "")
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass  # no answer: recorded as NO_ANSWER
        self.outcomes.append(
            Outcome(kind, step, sent, self.now() - sent, status, retry_after, served_by)
        )

    def _request(self, http: aiohttp.ClientSession, kind: Kind, n: int) -> Any:
        if kind == "get":
            return http.get(f"{self.entry}/user/get/{self.user_ids[n % len(self.user_ids)]}")
        if kind == "search":
            first, last = SEARCH_PREFIXES[n % len(SEARCH_PREFIXES)]
            return http.get(
                f"{self.entry}/user/search",
                params={"first_name": first, "last_name": last, "limit": "10"},
            )
        return http.post(
            f"{self.entry}/user/register",
            json={
                "first_name": "Дрилл",
                "second_name": f"Тестов{n}",
                "birthdate": "1990-01-01",
                "city": "Москва",
                "password": "drill-password",
            },
        )


async def seeded_user_ids(entry: str, count: int = 200) -> list[str]:
    """Ids of users that exist on both clusters (seeded before the replica caught up)."""
    ids: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for first, last in SEARCH_PREFIXES:
            params = {"first_name": first, "last_name": last, "limit": str(count)}
            async with http.get(f"{entry}/user/search", params=params) as r:
                r.raise_for_status()
                ids += [u["id"] for u in await r.json()]
    if not ids:
        raise RuntimeError(f"no seeded users found through {entry}")
    return ids


async def run_drill(
    entry: str,
    control: Callable[[str, str], Any],
    *,
    profile: str,
    rate: float = 100.0,
    step_seconds: float = 4.0,
    steps: Sequence[Step] = STEPS,
    say: Callable[[str], None] = lambda _: None,
    db_sessions: Callable[[str], Awaitable[bool]] | None = None,
) -> DrillResult:
    """Each step: run its action (if any), then hold the load for step_seconds.

    ``db_sessions(service)``, when given, tells whether a database has the
    service's sessions; after a database restarts it is asked every 50 ms, to
    time when the proxies send it traffic again.
    """
    load = OpenLoopLoad(entry, rate, await seeded_user_ids(entry))
    result = DrillResult(profile, rate, step_seconds, steps)
    stop = asyncio.Event()
    runner = asyncio.create_task(load.run(stop))
    watchers: list[asyncio.Task[None]] = []

    async def watch(index: int, service: str) -> None:
        assert db_sessions is not None
        # Polled: the sessions are another process's state; nothing here can signal them.
        while True:
            if await db_sessions(service):
                result.db_back[index] = load.now()
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.sleep(0)  # let the load start its clock
        for index, step in enumerate(steps):
            load.step = index
            started = load.now()
            say(f"[{profile}] step {index + 1}/{len(steps)}: {step.name}")
            if step.command is not None and step.service is not None:
                await control(step.command, step.service)
                if step.command == "start" and step.service in DATABASES and db_sessions:
                    watchers.append(asyncio.create_task(watch(index, step.service)))
            done = load.now()
            await asyncio.sleep(step_seconds if step.seconds is None else step.seconds)
            result.timings.append(StepTiming(started, done, load.now()))
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        stop.set()
        await runner
    result.outcomes = load.outcomes
    return result


def format_table(results: Mapping[str, DrillResult]) -> str:
    """Steps down, profiles across: reads and writes answered 200, and what else came back."""
    profiles = list(results)
    steps = next(iter(results.values())).steps
    header = ["step"]
    for p in profiles:
        header += [f"{p} reads 200", f"{p} writes 200", f"{p} other"]
    rows = [header]
    for i, step in enumerate(steps):
        row = [step.name]
        for p in profiles:
            r = results[p]
            reads, writes = r.counts(i, READS), r.counts(i, ("register",))
            other = (reads + writes) - Counter({200: reads[200] + writes[200]})
            row += [
                f"{reads[200]}/{sum(reads.values())}",
                f"{writes[200]}/{sum(writes.values())}",
                " ".join(f"{_label(s)}×{n}" for s, n in sorted(other.items())) or "-",
            ]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows
    )


def _label(status: int) -> str:
    return {NO_ANSWER: "no-answer", NOT_SENT: "not-sent"}.get(status, str(status))
