"""Prometheus metrics of one backend instance, in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "users_backend_requests_total",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "users_backend_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.db_retries = Counter(
            "users_backend_db_retries_total",
            "Database attempts made again after a broken connection, by the pool used",
            ["pool"],
            registry=registry,
        )
        self.reads = Counter(
            "users_backend_reads_total",
            "Database reads, by where they were served: replica (at once, or after a wait"
            " for a consistency token), master (a token the replica did not reach in time,"
            " a miss on the replica asked again, or a read that must see its own writes)",
            ["served_by"],
            registry=registry,
        )
        self.consistency_wait = Histogram(
            "users_backend_consistency_wait_seconds",
            "Time a read with a consistency token waited for the replica to apply it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )
        self.db_unavailable = Counter(
            "users_backend_db_unavailable_total",
            "Requests answered 503 because the database stayed unreachable",
            ["pool"],
            registry=registry,
        )


class PoolCollector(Collector):
    """Reads the pools' sizes at scrape time; nothing is counted per request."""

    def __init__(self, pools: Mapping[str, asyncpg.Pool]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[GaugeMetricFamily]:
        conns = GaugeMetricFamily(
            "users_backend_db_pool_connections",
            "Open connections of each pool, by state",
            labels=["pool", "state"],
        )
        limit = GaugeMetricFamily(
            "users_backend_db_pool_max_connections", "Size limit of each pool", labels=["pool"]
        )
        for name, pool in self._pools.items():
            size, idle = pool.get_size(), pool.get_idle_size()
            conns.add_metric([name, "idle"], idle)
            conns.add_metric([name, "busy"], size - idle)
            limit.add_metric([name], pool.get_max_size())
        yield conns
        yield limit
