"""lb's counters: plain integers bumped on the hot path, turned into Prometheus
families only when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxycore.histogram import Histogram
from proxycore.servers import Server

from .retry import RetryBudget

STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


# Every counter of LbMetrics: a worker's, summed by its supervisor (proxycore/counters.py).
FIELDS: Final = (
    "bad_requests",
    "client_active",
    "client_refused",
    "client_total",
    "hedge_wins",
    "hedges",
    "in_flight",
    "latency",
    "moved",
    "no_server",
    "queue_refused",
    "queue_timeouts",
    "queue_wait",
    "queued",
    "retries",
    "timeouts",
)


class LbMetrics:
    __slots__ = FIELDS

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
        # Requests lb answered itself, and those of servers since removed: the
        # rest of lb_request_duration_seconds is in each server's histogram.
        self.latency = Histogram()
        self.queue_timeouts = 0
        self.queue_refused = 0
        self.queued = 0  # requests waiting in the queue now
        self.queue_wait = Histogram()


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
        connecting = GaugeMetricFamily(
            "lb_server_connecting", "Connects in progress per server", labels=["server"]
        )
        max_conns = GaugeMetricFamily(
            "lb_server_max_conns", "Requests in flight allowed (0: no limit)", labels=["server"]
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
            connecting.add_metric([s.name], s.connecting)
            max_conns.add_metric([s.name], s.spec.max_conns)
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
            connecting,
            max_conns,
            checks,
            check_ok,
            check_time,
        )

        every = Histogram()
        for histogram in (m.latency, *(s.latency for s in servers)):
            every.add(histogram.to_json())
        yield every.family(
            "lb_request_duration_seconds", "From request head to the end of the response"
        )
        yield m.queue_wait.family(
            "lb_queue_wait_seconds",
            "How long requests waited for a slot on a server (those that waited)",
        )
        yield GaugeMetricFamily(
            "lb_queue_length", "Requests waiting for a slot now", value=m.queued
        )
        yield CounterMetricFamily(
            "lb_queue_timeouts",
            "Requests answered 503: no slot within queue.timeout",
            value=m.queue_timeouts,
        )
        yield CounterMetricFamily(
            "lb_queue_refused",
            "Requests answered 503: the queue was full (queue.max_queue)",
            value=m.queue_refused,
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
