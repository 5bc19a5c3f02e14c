"""The benchmark's own logic: reading wrk's output, fair ordering."""

from __future__ import annotations

import pytest

from bench.procs import rotated
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
    assert r.errors == 3


def test_parse_wrk_microseconds_and_garbage() -> None:
    r = parse(WRK.replace("1.69ms", "950.00us"))
    assert r.p50_ms == pytest.approx(0.95)
    with pytest.raises(ValueError):
        parse("wrk: connection refused")


def test_rotation_gives_every_contender_every_place() -> None:
    order = [rotated(("a", "b", "c"), r) for r in range(1, 4)]
    assert order == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    assert {o[0] for o in order} == {"a", "b", "c"}
