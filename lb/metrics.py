"""lb's counters: plain integers bumped on the hot path, turned into Prometheus
families only when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxycore.servers import Server

from .retry import RetryBudget

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
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
STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


class LbMetrics:
    __slots__ = (
        "bad_requests",
        "client_active",
        "client_refused",
        "client_total",
        "hedge_wins",
        "hedges",
        "in_flight",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "moved",
        "no_server",
        "retries",
        "timeouts",
    )

    def __init__(self) -> None:
        self.retries = 0
        self.hedges = 0
        self.hedge_wins = 0
        self.moved = 0
        self.no_server = 0
        self.bad_requests = 0
        self.timeouts = 0
        self.in_flight = 0
        self.client_active = 0
        self.client_total = 0
        self.client_refused = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, seconds: float) -> None:
        # Most requests land in the first buckets: a compiled scan from the
        # bottom beats bisect's generic compares (measured, lb per request).
        i = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.latency_buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1


class LbCollector(Collector):
    def __init__(
        self,
        metrics: LbMetrics,
        servers: Callable[[], Iterable[Server]],
        budget: Callable[[], RetryBudget],
    ) -> None:
        self._m = metrics
        self._servers = servers
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        m = self._m
        servers = list(self._servers())
        responses = CounterMetricFamily(
            "lb_responses",
            "Responses by server and status class (none: no answer)",
            labels=["server", "class"],
        )
        in_flight = GaugeMetricFamily(
            "lb_server_in_flight", "Requests in flight per server", labels=["server"]
        )
        up = GaugeMetricFamily(
            "lb_server_up", "1 when the server takes new requests", labels=["server", "state"]
        )
        weight = GaugeMetricFamily("lb_server_weight", "Configured weight", labels=["server"])
        failures = CounterMetricFamily(
            "lb_server_passive_failures",
            "Connect errors, resets, timeouts and configured statuses",
            labels=["server"],
        )
        connect_errors = CounterMetricFamily(
            "lb_server_connect_errors", "Failed connects", labels=["server"]
        )
        checks = CounterMetricFamily(
            "lb_checks", "Active checks by result", labels=["server", "result"]
        )
        check_ok = GaugeMetricFamily(
            "lb_check_last_ok", "1 when the last check passed", labels=["server"]
        )
        check_time = GaugeMetricFamily(
            "lb_check_duration_seconds", "Duration of the last check", labels=["server"]
        )
        for s in servers:
            for i, n in enumerate(s.by_class):
                responses.add_metric([s.name, STATUS_CLASSES[i]], n)
            in_flight.add_metric([s.name], s.active)
            up.add_metric([s.name, s.state], 1 if s.takes_traffic() else 0)
            weight.add_metric([s.name], s.weight)
            failures.add_metric([s.name], s.failures_total)
            connect_errors.add_metric([s.name], s.connect_errors)
            checks.add_metric([s.name, "ok"], s.checks_total - s.checks_failed)
            checks.add_metric([s.name, "failed"], s.checks_failed)
            if s.last_check is not None:
                check_ok.add_metric([s.name], 1 if s.last_check.ok else 0)
                check_time.add_metric([s.name], s.last_check.duration)
        yield from (
            responses,
            in_flight,
            up,
            weight,
            failures,
            connect_errors,
            checks,
            check_ok,
            check_time,
        )

        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), m.latency_buckets, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "lb_request_duration_seconds",
            "From request head to the end of the response",
            buckets=buckets,
            sum_value=m.latency_sum,
        )
        yield CounterMetricFamily(
            "lb_retries", "Requests sent again to another server", value=m.retries
        )
        yield CounterMetricFamily(
            "lb_hedges",
            "Requests sent to a second server after hedge_after without an answer",
            value=m.hedges,
        )
        yield CounterMetricFamily(
            "lb_hedge_wins", "Hedges whose server answered first", value=m.hedge_wins
        )
        budget = self._budget()
        yield CounterMetricFamily(
            "lb_retry_budget_exhausted",
            "Hedges and retries not made: the retry budget was spent",
            value=budget.exhausted,
        )
        yield GaugeMetricFamily(
            "lb_retry_budget_active",
            "Budget tokens held by requests in flight",
            value=budget.active,
        )
        yield CounterMetricFamily(
            "lb_requests_moved",
            "Requests sent again at once because the checks marked their server down",
            value=m.moved,
        )
        yield CounterMetricFamily(
            "lb_no_server", "Requests answered 503: no server up", value=m.no_server
        )
        yield CounterMetricFamily(
            "lb_bad_requests", "Requests refused with a 4xx by lb itself", value=m.bad_requests
        )
        yield CounterMetricFamily(
            "lb_upstream_timeouts", "First-byte or idle timeouts of upstreams", value=m.timeouts
        )
        yield GaugeMetricFamily("lb_in_flight", "Requests in flight", value=m.in_flight)
        yield GaugeMetricFamily(
            "lb_client_connections", "Open client connections", value=m.client_active
        )
        yield CounterMetricFamily(
            "lb_client_connections_accepted", "Client connections accepted", value=m.client_total
        )
        yield CounterMetricFamily(
            "lb_client_connections_refused",
            "Client connections closed at once: over the limit",
            value=m.client_refused,
        )
