"""The seed's failure drill on both profiles, at the HTTP entry, every response counted.

python (lb + dbproxy): every read is 200 in every step; a write fails only while
the master is down (503 with Retry-After), when it was in flight on the backend
at the moment that backend was killed (502: it may have run, so it is not
retried), or when it waited on the frozen backend (it is never sent twice). In
the gray steps (a backend, then the replica, frozen for 6 s and thawed) no read
waits for the thaw (see SLOWEST_GRAY_READ). classic (nginx + HAProxy): the
seed's claim, that the service answers again after each kill; its counts are
printed beside python's at the end of the run (see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.drill import (
    GRAY_STEPS,
    NO_ANSWER,
    READS,
    STEPS,
    DrillResult,
    StackControl,
    format_table,
    run_drill,
)
from tests.stackctl import running_stack

# dbproxy's check timing (infra/balance/dbproxy.toml): a master that is back is
# writable again within rise x interval, plus one interval for the check's phase;
# the rest is the backends' pools reconnecting.
RISE, INTERVAL, CHECK_TIMEOUT, DB_STALL = 2, 1.0, 1.0, 0.5
WRITES_BACK_WITHIN = RISE * INTERVAL + INTERVAL + 1.5
STEP_SECONDS = 4.0
# The slowest read while a server is frozen, in seconds. A backend: lb hedges
# what waits on it and takes it out within [timeouts] stall (0.2 s; the step's
# slowest read is about 0.3 s). The replica: dbproxy finds it by its sessions'
# silence (stall, then an SSLRequest unanswered as long), about 1 s after the
# freeze; when the traffic's byte counts give no sign (the last queries went
# out before its last answer came in, so nothing is seen owed), by its check
# timing out then that same SSLRequest: at most interval + timeout + stall.
# Either is far from waiting for the thaw (6 s; HAProxy's slowest read, 4.8 s).
SLOWEST_GRAY_READ = {
    "backend frozen": 1.5,
    "backend thawed": 1.5,
    "replica frozen": INTERVAL + CHECK_TIMEOUT + DB_STALL + 0.5,
    "replica thawed": 1.5,
}
DRILL_RESULTS = pytest.StashKey[dict[str, DrillResult]]()


def step_index(name: str) -> int:
    return [s.name for s in STEPS].index(name)


def check_python(result: DrillResult) -> None:
    for i, step in enumerate(STEPS):
        reads = result.counts(i, READS)
        assert set(reads) == {200}, f"{step.name}: reads {dict(reads)}"
        assert reads[200] > 100, f"{step.name}: too few reads to judge ({reads[200]})"

        timing = result.timings[i]
        failed = [o for o in result.of_step(i, ("register",)) if o.status != 200]
        if step.name == "backend killed":
            for o in failed:
                assert o.status == 502 and o.sent <= timing.done, (step.name, o)
        elif step.name == "master killed":
            assert failed, "writes went on without a master"
            for o in failed:
                assert o.status == 503 and o.retry_after, (step.name, o)
        elif step.name == "backend frozen":
            for o in failed:  # waited on the frozen backend past the load's timeout
                assert o.status in (NO_ANSWER, 504), (step.name, o)
        elif step.name == "master restarted":
            for o in failed:
                assert o.status == 503 and o.retry_after, (step.name, o)
                assert o.sent <= timing.done + WRITES_BACK_WITHIN, (
                    f"writes still failing {o.sent - timing.done:.1f}s after the master was back"
                )
        else:
            assert not failed, f"{step.name}: writes failed: {failed}"
        if i in GRAY_STEPS:
            slowest = max(o.latency for o in result.of_step(i, READS))
            bound = SLOWEST_GRAY_READ[step.name]
            assert slowest <= bound, f"{step.name}: a read took {slowest:.2f}s (at most {bound}s)"


def check_classic(result: DrillResult) -> None:
    for i, step in enumerate(STEPS):
        if step.command == "freeze":
            continue  # recorded beside python's, whatever it scores
        timing = result.timings[i]
        # The seed's claim: after each kill (or thaw) the service answers again;
        # the last second of the step must be clean.
        tail = [o for o in result.of_step(i, READS) if o.sent >= timing.ended - 1.0]
        assert tail and all(o.status == 200 for o in tail), (
            f"{step.name}: reads in the last second {sorted({o.status for o in tail})}"
        )


@pytest.mark.parametrize("profile", ["python", "classic"])
async def test_the_seeds_failure_drill(
    profile: str, tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    with running_stack(tmp_path / "stack", users=2000, extra=["--proxies", profile]) as stack:
        result = await run_drill(
            f"http://127.0.0.1:{stack.ports.entry}",
            StackControl(stack.state_dir),
            profile=profile,
            step_seconds=STEP_SECONDS,
        )
    pytestconfig.stash.setdefault(DRILL_RESULTS, {})[profile] = result
    print(format_table({profile: result}))
    (check_python if profile == "python" else check_classic)(result)


def drill_summary(config: pytest.Config) -> str | None:
    results = config.stash.get(DRILL_RESULTS, None)
    if not results:
        return None
    return format_table(results)
