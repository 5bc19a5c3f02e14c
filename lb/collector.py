"""lb's /metrics: the counters of the whole server (lb/metrics.py), of each pool
and its servers, and of each route, turned into Prometheus families when
scraped (nothing on the hot path). A server's families carry its pool and its
name; a route's its name and pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxycore.histogram import Histogram

from .metrics import STATUS_CLASSES, LbMetrics
from .pools import Pool
from .routes import Route

SERVER = ["pool", "server"]


class LbCollector(Collector):
    def __init__(
        self,
        metrics: LbMetrics,
        pools: Callable[[], Mapping[str, Pool]],
        routes: Callable[[], Sequence[Route]],
    ) -> None:
        self._m = metrics
        self._pools = pools
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        pools = self._pools()
        yield from self._servers(pools)
        yield from self._pools_families(pools)
        yield from self._routes_families(self._routes())
        yield from self._whole(self._m)

    @staticmethod
    def _servers(pools: Mapping[str, Pool]) -> Iterator[Metric]:
        responses = CounterMetricFamily(
            "lb_responses",
            "Responses by server and status class (none: no answer)",
            labels=[*SERVER, "class"],
        )
        in_flight = GaugeMetricFamily(
            "lb_server_in_flight", "Requests in flight per server", labels=SERVER
        )
        up = GaugeMetricFamily(
            "lb_server_up", "1 when the server takes new requests", labels=[*SERVER, "state"]
        )
        weight = GaugeMetricFamily("lb_server_weight", "Configured weight", labels=SERVER)
        failures = CounterMetricFamily(
            "lb_server_passive_failures",
            "Connect errors, resets, timeouts and configured statuses",
            labels=SERVER,
        )
        connect_errors = CounterMetricFamily(
            "lb_server_connect_errors", "Failed connects", labels=SERVER
        )
        connecting = GaugeMetricFamily(
            "lb_server_connecting", "Connects in progress per server", labels=SERVER
        )
        max_conns = GaugeMetricFamily(
            "lb_server_max_conns", "Requests in flight allowed (0: no limit)", labels=SERVER
        )
        checks = CounterMetricFamily(
            "lb_checks", "Active checks by result", labels=[*SERVER, "result"]
        )
        check_ok = GaugeMetricFamily(
            "lb_check_last_ok", "1 when the last check passed", labels=SERVER
        )
        check_time = GaugeMetricFamily(
            "lb_check_duration_seconds", "Duration of the last check", labels=SERVER
        )
        for name, pool in pools.items():
            for s in pool.servers:
                who = [name, s.name]
                for i, n in enumerate(s.by_class):
                    responses.add_metric([*who, STATUS_CLASSES[i]], n)
                in_flight.add_metric(who, s.active)
                up.add_metric([*who, s.state], 1 if s.takes_traffic() else 0)
                weight.add_metric(who, s.weight)
                failures.add_metric(who, s.failures_total)
                connect_errors.add_metric(who, s.connect_errors)
                connecting.add_metric(who, s.connecting)
                max_conns.add_metric(who, s.spec.max_conns)
                checks.add_metric([*who, "ok"], s.checks_total - s.checks_failed)
                checks.add_metric([*who, "failed"], s.checks_failed)
                if s.last_check is not None:
                    check_ok.add_metric(who, 1 if s.last_check.ok else 0)
                    check_time.add_metric(who, s.last_check.duration)
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

    def _pools_families(self, pools: Mapping[str, Pool]) -> Iterator[Metric]:
        duration = HistogramMetricFamily(
            "lb_request_duration_seconds",
            "From request head to the end of the response, by pool "
            '("-": answered by lb itself, or by a server since removed)',
            labels=["pool"],
        )
        exhausted = CounterMetricFamily(
            "lb_retry_budget_exhausted",
            "Hedges and retries not made: the pool's retry budget was spent (concurrency: "
            "too many in flight; window: the last window's share)",
            labels=["pool", "reason"],
        )
        hedges = CounterMetricFamily(
            "lb_pool_hedges",
            "The pool's hedges: sent, won (answered first), suppressed (paused: hedges "
            "were not winning)",
            labels=["pool", "outcome"],
        )
        delay = GaugeMetricFamily(
            "lb_hedge_delay_seconds",
            "How long a request waits for its first byte before a hedge: the pool's recent "
            "latency at hedge_percentile, hedge_after the least",
            labels=["pool"],
        )
        paused = GaugeMetricFamily(
            "lb_hedging_paused", "1 while the pool's hedges are not winning", labels=["pool"]
        )
        active = GaugeMetricFamily(
            "lb_retry_budget_active", "Budget tokens held by requests in flight", labels=["pool"]
        )
        self._m.latency.add_to(duration, ["-"])
        for name, pool in pools.items():
            every = Histogram()
            for server in pool.servers:
                every.add(server.latency.to_json())
            every.add_to(duration, [name])
            exhausted.add_metric([name, "concurrency"], pool.budget.exhausted)
            exhausted.add_metric([name, "window"], pool.budget.spent)
            active.add_metric([name], pool.budget.active)
            h = pool.hedges
            for outcome, n in (("sent", h.sent), ("won", h.won), ("suppressed", h.suppressed)):
                hedges.add_metric([name, outcome], n)
            delay.add_metric([name], h.after(pool.config.hedge_after))
            paused.add_metric([name], 1.0 if h.paused else 0.0)
        yield from (duration, exhausted, active, hedges, delay, paused)

    @staticmethod
    def _routes_families(routes: Sequence[Route]) -> Iterator[Metric]:
        responses = CounterMetricFamily(
            "lb_route_responses",
            "Responses by route and status class (none: no answer)",
            labels=["route", "pool", "class"],
        )
        limited = CounterMetricFamily(
            "lb_route_limited",
            "Requests refused by the route's rate limit (429, or its status)",
            labels=["route"],
        )
        for route in routes:
            pool = route.pool.name
            for i, n in enumerate(route.by_class):
                responses.add_metric([route.name, pool, STATUS_CLASSES[i]], n)
            limited.add_metric([route.name], route.limited)
        yield from (responses, limited)

    @staticmethod
    def _whole(m: LbMetrics) -> Iterator[Metric]:
        yield m.queue_wait.family(
            "lb_queue_wait_seconds",
            "How long requests waited for a slot on a server (those that waited)",
        )
        yield m.dispatch_wait.family(
            "lb_dispatch_wait_seconds",
            "From a request's head read to its first attempt sent: its turn, the rate "
            "limit's delay, the queue, a connect",
        )
        gauges = (
            ("lb_queue_length", "Requests waiting for a slot now", m.queued),
            ("lb_in_flight", "Requests in flight", m.in_flight),
            ("lb_client_connections", "Open client connections", m.client_active),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        counters = (
            (
                "lb_queue_timeouts",
                "Requests answered 503: no slot within queue.timeout",
                m.queue_timeouts,
            ),
            (
                "lb_queue_refused",
                "Requests answered 503: the queue was full (queue.max_queue)",
                m.queue_refused,
            ),
            (
                "lb_queue_abandoned",
                "Requests dropped from the queue: their client closed before a slot freed",
                m.gone_queued,
            ),
            ("lb_retries", "Requests sent again to another server", m.retries),
            (
                "lb_hedges",
                "Requests sent to a second server after hedge_after without an answer",
                m.hedges,
            ),
            ("lb_hedge_wins", "Hedges whose server answered first", m.hedge_wins),
            (
                "lb_requests_moved",
                "Requests sent again at once because the checks marked their server down",
                m.moved,
            ),
            ("lb_no_server", "Requests answered 503: no server up", m.no_server),
            ("lb_bad_requests", "Requests refused with a 4xx by lb itself", m.bad_requests),
            ("lb_upstream_timeouts", "First-byte or idle timeouts of upstreams", m.timeouts),
            ("lb_client_connections_accepted", "Client connections accepted", m.client_total),
            (
                "lb_client_connections_refused",
                "Client connections closed at once: over the limit",
                m.client_refused,
            ),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
