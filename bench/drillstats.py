"""What a drill's recorded requests say: errors per step, recovery times, a per-second timeline.

Definitions (they are the report's, and the JSON's):
- an error is a read that did not answer 200, or a write that did not answer 200;
  a write refused with 503 + Retry-After while the master is down is counted
  as an error too, but apart (``writes_refused``), since it is the designed answer;
- a clean second is one second of sent requests in which every read answered
  200 (writes are left out: without a master they cannot succeed);
- "kill → clean" is the time from the kill command to the first clean second
  after the step's last failed read (0 when no read failed): when the service
  was whole again, however late the failures began;
- "restart → traffic" is the time from the start command to the first request
  the restarted server served: a backend by the X-Served-By of the answers, a
  database by its first session of the service (polled in pg_stat_activity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .drill import READS, DrillResult, Outcome


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ok(o: Outcome) -> bool:
    return o.status == 200


@dataclass(frozen=True, slots=True)
class StepStats:
    name: str
    action: str | None
    started_s: float  # when the step (and its action) began, since the load started
    action_done_s: float  # when the service was killed, or back and ready
    ended_s: float
    reads: int
    read_errors: int
    writes: int
    write_errors: int
    writes_refused: int  # 503 with Retry-After: the master is down and the service says so
    kill_to_clean_s: float | None  # kill steps only
    restart_to_traffic_s: float | None  # start steps only
    p99_ms: float
    slowest_read_ms: float  # the longest a read that was answered took


def step_stats(result: DrillResult) -> list[StepStats]:
    stats = []
    for i, step in enumerate(result.steps):
        reads = result.of_step(i, READS)
        writes = result.of_step(i, ("register",))
        timing = result.timings[i]
        everything = reads + writes
        stats.append(
            StepStats(
                name=step.name,
                action=f"{step.command} {step.service}" if step.command else None,
                started_s=round(timing.started, 3),
                action_done_s=round(timing.done, 3),
                ended_s=round(timing.ended, 3),
                reads=len(reads),
                read_errors=sum(not _ok(o) for o in reads),
                writes=len(writes),
                write_errors=sum(not _ok(o) for o in writes),
                writes_refused=sum(o.status == 503 and o.retry_after for o in writes),
                kill_to_clean_s=(
                    kill_to_clean(result, timing.started, timing.ended)
                    if step.command == "kill"
                    else None
                ),
                restart_to_traffic_s=(
                    restart_to_traffic(result, i) if step.command == "start" else None
                ),
                p99_ms=percentile([o.latency for o in everything if o.status > 0], 99) * 1000,
                slowest_read_ms=max((o.latency for o in reads if o.status > 0), default=0.0) * 1000,
            )
        )
    return stats


def kill_to_clean(result: DrillResult, killed: float, until: float) -> float | None:
    """Seconds from ``killed`` to the first clean second after the step's last failed
    read; 0 when no read failed, None when no clean second followed within the step."""
    reads = [o for o in result.outcomes if o.kind in READS and killed <= o.sent < until]
    failed = [o.sent for o in reads if not _ok(o)]
    if not failed:
        return 0.0
    start = max(failed) + 1e-6
    window = [o for o in reads if start <= o.sent < start + 1.0]
    if start + 1.0 > until or not window:
        return None
    return round(start - killed, 3)


def restart_to_traffic(result: DrillResult, index: int) -> float | None:
    step, timing = result.steps[index], result.timings[index]
    if index in result.db_back:
        return round(result.db_back[index] - timing.started, 3)
    served = [
        o.sent + o.latency
        for o in result.outcomes
        if o.served_by == step.service and o.sent >= timing.started
    ]
    return round(min(served) - timing.started, 3) if served else None


@dataclass(frozen=True, slots=True)
class Second:
    t: int  # seconds since the load started
    ok: int
    errors: int
    p99_ms: float


def timeline(result: DrillResult) -> list[Second]:
    """Per whole second of sending: answered 200, errors, p99 latency of what was answered."""
    if not result.outcomes:
        return []
    # Whole seconds only: the last, cut short by the end of the load, would show as a drop.
    whole = int(max(o.sent for o in result.outcomes))
    bins: list[list[Outcome]] = [[] for _ in range(whole)]
    for o in result.outcomes:
        if o.sent < whole:
            bins[int(o.sent)].append(o)
    return [
        Second(
            t=t,
            ok=sum(_ok(o) for o in b),
            errors=sum(not _ok(o) for o in b),
            p99_ms=percentile([o.latency for o in b if o.status > 0], 99) * 1000,
        )
        for t, b in enumerate(bins)
    ]


def latency_ms(result: DrillResult, step: int = 0) -> dict[str, float]:
    """p50, p99 and p99.9 of the answered requests of one step (the first: all up)."""
    values = [o.latency for o in result.of_step(step) if o.status > 0]
    return {
        "p50": round(percentile(values, 50) * 1000, 2),
        "p99": round(percentile(values, 99) * 1000, 2),
        "p99.9": round(percentile(values, 99.9) * 1000, 2),
    }
