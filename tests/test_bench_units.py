"""The benchmark's own logic: reading wrk's output, fair ordering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare import ratios, report
from bench.drill import STEPS, DrillResult, Outcome, StepTiming
from bench.drillstats import (
    kill_to_clean,
    percentile,
    restart_to_traffic,
    step_stats,
    timeline,
)
from bench.pg import (
    STEAL_LIMIT,
    Slice,
    interleaved,
    kept_turn,
    most_stolen,
    slicing,
    stolen_from,
    summed,
)
from bench.procs import CLOCK_TICKS, rotated, stolen_seconds
from bench.wrk import parse

WRK = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.70ms  250.00us   9.10ms   80.00%
    Req/Sec    29.90k     1.10k   31.00k    70.00%
  Latency Distribution
     50%    1.69ms
     75%    1.80ms
     90%    2.00ms
     99%    2.47ms
  298960 requests in 10.00s, 40.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  29896.00
Transfer/sec:      4.00MB
"""


def test_parse_wrk() -> None:
    r = parse(WRK)
    assert r.requests == 298960 and r.seconds == 10.0 and r.rps == 29896.0
    assert r.p50_ms == pytest.approx(1.69) and r.p99_ms == pytest.approx(2.47)
    assert r.errors == 3 and r.max_ms == pytest.approx(9.10)


def test_parse_wrk_microseconds_and_garbage() -> None:
    r = parse(WRK.replace("1.69ms", "950.00us"))
    assert r.p50_ms == pytest.approx(0.95)
    with pytest.raises(ValueError):
        parse("wrk: connection refused")


def test_rotation_gives_every_contender_every_place() -> None:
    order = [rotated(("a", "b", "c"), r) for r in range(1, 4)]
    assert order == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    assert {o[0] for o in order} == {"a", "b", "c"}


PROC_STAT = """cpu  1301381 0 1522315 1935528 6187 0 521448 3379 0 0
cpu0 639654 0 795333 897981 986 0 314961 1688 0 0
cpu1 661727 0 726982 1037547 5201 0 206487 1691 0 0
cpu10 1 0 1 1 0 0 0 500 0 0
intr 1 2 3
"""


def test_steal_is_read_per_core_in_the_order_asked() -> None:
    # cpu (all cores) and cpu10 must not be taken for cpu0 or cpu1.
    assert stolen_seconds((1, 0), PROC_STAT) == [1691 / CLOCK_TICKS, 1688 / CLOCK_TICKS]
    assert stolen_seconds((10,), PROC_STAT) == [500 / CLOCK_TICKS]


def test_a_turn_counts_unless_the_hypervisor_took_a_core_from_one_of_its_runs() -> None:
    calm = {"proxy_core": 0.3, "load_core": STEAL_LIMIT}
    assert stolen_from({"direct": calm, "haproxy": calm, "dbproxy": calm}) is None
    why = stolen_from(
        {
            "haproxy": calm,
            "dbproxy": {"proxy_core": 0.1, "load_core": 12.5},
            "direct": {"proxy_core": 9.0, "load_core": 0.0},
        }
    )
    assert why == "the hypervisor took 12.5% of the load core during dbproxy's slices"
    assert stolen_from({"direct": calm}, limit=0.2) == (
        "the hypervisor took 0.3% of the proxy core during direct's slices"
    )


def test_a_turn_is_cut_into_whole_second_slices_taken_in_order_then_backwards() -> None:
    assert slicing(10) == (5, 2) and slicing(3) == (1, 3) and slicing(7) == (3, 2)
    assert slicing(0.5) == (1, 1)
    order = ("haproxy", "direct", "dbproxy")
    assert interleaved(order, 1) == list(order)
    assert interleaved(order, 3) == [*order, *reversed(order), *order]
    sequence = interleaved(order, 4)
    assert all(sequence.count(path) == 4 for path in order)
    # in pairs of passes every path sits at the same mean position: a steady drift
    # of the machine's falls on each alike
    places = {path: [i for i, p in enumerate(sequence) if p == path] for path in order}
    assert len({sum(v) for v in places.values()}) == 1


def test_a_paths_slices_sum_up_to_its_run_of_the_turn() -> None:
    slices = [
        Slice(tps=100.0, seconds=2, cpu=0.01, wall=2.5, stolen=[0.0, 0.05]),
        Slice(tps=300.0, seconds=2, cpu=0.03, wall=2.5, stolen=[0.1, 0.0]),
    ]
    run = summed(slices, proxy=True)
    assert run.tps == 200.0
    assert run.cpu == (0.04 / 800) * 1e6  # µs per transaction over both
    assert run.steal == {"proxy_core": 2.0, "load_core": 1.0}
    assert run.slices == [100.0, 300.0]
    assert summed(slices, proxy=False).cpu is None


def test_the_first_calm_attempt_at_a_turn_counts_else_the_least_stolen() -> None:
    calm = {"proxy_core": 0.1, "load_core": 0.0}
    assert most_stolen({"haproxy": calm, "dbproxy": {"proxy_core": 0.2, "load_core": 7.3}}) == 7.3
    assert kept_turn([{"direct": calm}]) == 0
    stolen = [{"direct": {"proxy_core": 9.0, "load_core": 0.0}}, {"direct": {"proxy_core": 4.5}}]
    assert kept_turn([*stolen, {"direct": calm}]) == 2
    assert kept_turn([*stolen, {"direct": {"proxy_core": 6.0}}]) == 1


# -- the drill's statistics, on recorded requests made up here ----------------------


def drill_of(outcomes: list[Outcome], timings: list[StepTiming]) -> DrillResult:
    result = DrillResult("python", 10.0, 2.0, STEPS[: len(timings)], timings=timings)
    result.outcomes = outcomes
    return result


def read(sent: float, status: int = 200, step: int = 1, served_by: str = "") -> Outcome:
    return Outcome("get", step, sent, 0.01, status, False, served_by)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100 and percentile([7.0], 99.9) == 7
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_kill_to_clean_is_the_first_whole_second_of_good_reads() -> None:
    # Killed at 10.0; reads fail until 10.45, then every 0.1 s succeed.
    outcomes = [read(10.0 + i / 10, 502 if i < 5 else 200) for i in range(40)]
    result = drill_of(outcomes, [StepTiming(0, 0, 10), StepTiming(10.0, 10.2, 14.0)])
    assert kill_to_clean(result, 10.0, 14.0) == pytest.approx(0.4, abs=1e-3)
    # Failures that begin late (a proxy slow to notice) still count from the kill.
    late = [read(10.0 + i / 10, 502 if 12 <= i < 20 else 200) for i in range(40)]
    assert kill_to_clean(drill_of(late, result.timings), 10.0, 14.0) == pytest.approx(1.9, abs=1e-3)
    # Never stumbling counts as clean at once; never clean is None.
    clean = drill_of([read(10 + i / 10) for i in range(40)], result.timings)
    assert kill_to_clean(clean, 10.0, 14.0) == 0.0
    broken = drill_of([read(10 + i / 10, 0) for i in range(40)], result.timings)
    assert kill_to_clean(broken, 10.0, 14.0) is None


def test_restart_to_traffic_by_the_backend_that_answered() -> None:
    outcomes = [read(20 + i / 10, served_by="users-backend-2", step=4) for i in range(10)]
    outcomes.append(read(21.5, served_by="users-backend-1", step=4))
    timings = [StepTiming(0, 0, 5)] * 4 + [StepTiming(20.0, 20.8, 24.0)]
    result = drill_of(outcomes, timings)
    assert STEPS[4].service == "users-backend-1"
    assert restart_to_traffic(result, 4) == pytest.approx(1.51)
    result.db_back[4] = 22.0  # a database's return, when watched, wins
    assert restart_to_traffic(result, 4) == pytest.approx(2.0)


def test_step_stats_and_timeline_count_every_request() -> None:
    outcomes = [read(0.5, step=0), read(1.5, 0, step=1), read(1.6, step=1), read(2.1, step=1)]
    outcomes.append(Outcome("register", 1, 1.7, 0.02, 503, True))
    result = drill_of(outcomes, [StepTiming(0, 0, 1), StepTiming(1.0, 1.1, 3.0)])
    first, second = step_stats(result)
    assert (first.reads, first.read_errors, first.writes) == (1, 0, 0)
    assert (second.reads, second.read_errors) == (3, 1)
    assert (second.writes, second.write_errors, second.writes_refused) == (1, 1, 1)
    # The second cut short by the end of the load (2.0-2.1) is left out.
    assert [(s.t, s.ok, s.errors) for s in timeline(result)] == [(0, 1, 0), (1, 1, 2)]


# -- the report, from the committed full run ------------------------------------------

COMMITTED_RUN = Path(__file__).resolve().parent.parent / "bench/results/full"


def test_report_and_ratios_of_the_committed_run() -> None:
    result = json.loads((COMMITTED_RUN / "results.json").read_text())
    assert result["schema"] == 1 and set(result["profiles"]) == {"python", "classic"}
    assert ratios(result) == result["ratios"]  # the same figures, recomputed
    text = report(result)
    assert text == (COMMITTED_RUN / "REPORT.md").read_text()  # what the docs quote
    for step in STEPS:
        assert f"| {step.name} |" in text
    assert "![drill timeline, classic](drill-classic.png)" in text and "ratios.png" in text
    # What the README quotes is what the run wrote.
    classic = {s["name"]: s for s in result["profiles"]["classic"]["drill"]["steps"]}
    assert "| replica killed | 0/" in text and classic["replica killed"]["read_errors"] > 0
