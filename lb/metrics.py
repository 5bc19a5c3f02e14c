"""lb's counters of the whole server: plain integers bumped on the hot path,
turned into Prometheus families only when /metrics is scraped (lb/collector.py,
with the pools', servers' and routes' own)."""

from __future__ import annotations

from typing import Final

from proxycore.histogram import Histogram

STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


# Every counter of LbMetrics: a worker's, summed by its supervisor (proxycore/counters.py).
FIELDS: Final = (
    "bad_requests",
    "client_active",
    "client_refused",
    "client_total",
    "dispatch_wait",
    "gone_queued",
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
        # From a request's head read to its first attempt sent (or given up):
        # every wait of lb's own (its turn on the connection, the rate limit's
        # delay, the queue, a connect), the time no server's histogram has.
        self.dispatch_wait = Histogram()
        self.gone_queued = 0  # requests dropped from the queue: their client closed
