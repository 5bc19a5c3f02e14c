"""When a pool hedges: after its own recent latency, and not while hedges lose.

"The Tail at Scale" hedges a request still unanswered at about the 95th
percentile of its kind: the pool's latency at ``percentile`` over the last
``window`` seconds (its servers' histograms, read once a second) is the hedge
delay, the route's hedge_after its floor. A pool slow all over gains nothing
from hedging (the second server is as slow as the first) and pays for it in
load: while fewer than ``min_wins`` percent of the window's hedges won, hedging
pauses, but for one a second, which shows when they win again.

Pure: the pool feeds it counts and the time; lb/hedging.py asks it.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from proxycore.histogram import BUCKETS, quantile

# Hedges a window must have seen before their wins decide anything; answers it
# must have seen before its percentile stands for the pool.
MIN_HEDGES: Final = 5
MIN_ANSWERS: Final = 20
PROBE_EVERY: Final = 1.0  # seconds between the hedges that go while paused


class HedgePolicy:
    __slots__ = (
        "_last_probe",
        "_marks",
        "delay",
        "min_wins",
        "paused",
        "percentile",
        "sent",
        "suppressed",
        "window",
        "won",
    )

    def __init__(self, percentile: int, min_wins: int, window: float, now: float) -> None:
        self.percentile = percentile
        self.min_wins = min_wins
        self.window = window
        self.delay = 0.0  # the pool's recent latency at the percentile; 0: not known
        self.paused = False
        self.sent = 0  # hedges sent
        self.won = 0  # hedges whose server answered first
        self.suppressed = 0  # hedges not sent: paused
        self._last_probe = float("-inf")
        # (time, latency counts, sent, won) each tick, the oldest at most a window old
        self._marks: deque[tuple[float, list[int], int, int]] = deque(
            [(now, [0] * (len(BUCKETS) + 1), 0, 0)]
        )

    def after(self, floor: float) -> float:
        """The hedge delay of a route whose hedge_after is ``floor``."""
        delay = self.delay
        return delay if delay > floor else floor

    def may_hedge(self, now: float) -> bool:
        """Whether a hedge that is due goes (False: paused, and not a probe)."""
        if not self.paused:
            return True
        if now - self._last_probe >= PROBE_EVERY:
            self._last_probe = now
            return True
        self.suppressed += 1
        return False

    def tick(self, now: float, counts: list[int]) -> None:
        """Once a second: ``counts``, the pool's answers by latency bucket so far."""
        marks = self._marks
        marks.append((now, counts, self.sent, self.won))
        while len(marks) > 1 and marks[1][0] <= now - self.window:
            marks.popleft()
        _, old, sent, won = marks[0]
        recent = [max(0, n - o) for n, o in zip(counts, old, strict=False)]
        if self.percentile and sum(recent) >= MIN_ANSWERS:
            self.delay = quantile(recent, self.percentile / 100)
        else:
            self.delay = 0.0
        sent = self.sent - sent
        won = self.won - won
        if not self.min_wins:
            self.paused = False
        elif sent >= MIN_HEDGES:  # (fewer: too few to judge, it stays as it was)
            self.paused = won * 100 < sent * self.min_wins
