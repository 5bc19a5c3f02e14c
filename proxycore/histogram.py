"""A latency histogram as plain integers, turned into a Prometheus family at scrape time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prometheus_client.core import HistogramMetricFamily

BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def quantile(counts: Sequence[int], q: float) -> float:
    """The ``q`` quantile (0 < q < 1) of counts by BUCKETS (the last one: above
    them all), interpolated within its bucket as Prometheus's
    histogram_quantile is; 0.0 when there are none."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    low = 0.0
    for i, n in enumerate(counts):
        if i == len(BUCKETS):
            return low  # above the last bound: that bound is all that is known
        high = BUCKETS[i]
        if n > 0 and seen + n >= rank:
            return low + (high - low) * (rank - seen) / n
        seen += n
        low = high
    return low


class Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # Most observations land in the first buckets: a compiled scan from the
        # bottom beats bisect's generic compares (measured, lb per request).
        i = 0
        for bound in BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.count += 1

    def family(self, name: str, text: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, text, buckets=self._buckets(), sum_value=self.total)

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        """This histogram as ``family``'s sample of ``labels``."""
        family.add_metric(labels, self._buckets(), self.total)

    def _buckets(self) -> list[tuple[str, float]]:
        cumulative, buckets = 0, []
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", float(cumulative)))
        return buckets

    def to_json(self) -> dict[str, object]:
        return {"counts": list(self.counts), "total": self.total, "count": self.count}

    def add(self, other: dict[str, object]) -> None:
        """Another process's histogram (to_json) into this one."""
        counts = other["counts"]
        assert isinstance(counts, list)
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.total += float(other["total"])  # type: ignore[arg-type]
        self.count += int(other["count"])  # type: ignore[call-overload]
