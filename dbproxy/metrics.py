"""dbproxy's counters, read at scrape time: per listener and per server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxycore.histogram import Histogram

from .pgwire import lsn_bytes
from .totals import Counted

ROLES = ("primary", "replica")

# How long sessions waited for a slot (proxycore's histogram, named for here).
WaitHistogram = Histogram


class DbProxyCollector(Collector):
    """Read from the proxy at each scrape (its counters are the workers' sum
    in a supervisor); ``pools``: the server pools' rows, summed likewise."""

    def __init__(self, proxy: Counted, pools: Callable[[], list[dict[str, Any]]]) -> None:
        self._proxy = proxy
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "dbproxy_listener_sessions", "Open sessions per listener", labels=["listener"]
        )
        total = CounterMetricFamily(
            "dbproxy_listener_sessions", "Sessions accepted per listener", labels=["listener"]
        )
        for listener in self._proxy.listeners.values():
            active.add_metric([listener.name], listener.active)
            total.add_metric([listener.name], listener.total)
        yield active
        yield total
        s_active = GaugeMetricFamily(
            "dbproxy_server_sessions", "Open sessions per server", labels=["server"]
        )
        s_total = CounterMetricFamily(
            "dbproxy_server_sessions", "Sessions sent to each server", labels=["server"]
        )
        b_in = CounterMetricFamily(
            "dbproxy_server_bytes_received", "Bytes from each server", labels=["server"]
        )
        b_out = CounterMetricFamily(
            "dbproxy_server_bytes_sent", "Bytes to each server", labels=["server"]
        )
        connect = CounterMetricFamily(
            "dbproxy_server_connect_failures", "Failed connects", labels=["server"]
        )
        connecting = GaugeMetricFamily(
            "dbproxy_server_connecting", "Connects in progress per server", labels=["server"]
        )
        limit = GaugeMetricFamily(
            "dbproxy_server_max_sessions",
            "Sessions allowed at once (0: no limit)",
            labels=["server"],
        )
        up = GaugeMetricFamily(
            "dbproxy_server_up", "1 when the server takes new sessions", labels=["server", "state"]
        )
        role = GaugeMetricFamily(
            "dbproxy_server_role", "1 for the role the last check saw", labels=["server", "role"]
        )
        lag_b = GaugeMetricFamily(
            "dbproxy_replica_lag_bytes", "Replica lag read on the primary", labels=["server"]
        )
        lag_s = GaugeMetricFamily(
            "dbproxy_replica_lag_seconds", "Replica lag in time (replay_lag)", labels=["server"]
        )
        applied = GaugeMetricFamily(
            "dbproxy_replica_applied_lsn_bytes",
            "The primary's WAL position the replica has confirmed applying, in bytes",
            labels=["server"],
        )
        check = GaugeMetricFamily(
            "dbproxy_check_duration_seconds", "Duration of the last check", labels=["server"]
        )
        check_ok = GaugeMetricFamily(
            "dbproxy_check_last_ok", "1 when the last check passed", labels=["server"]
        )
        for s in self._proxy.servers:
            s_active.add_metric([s.name], s.active)
            s_total.add_metric([s.name], s.total)
            b_in.add_metric([s.name], s.bytes_in)
            b_out.add_metric([s.name], s.bytes_out)
            connect.add_metric([s.name], s.connect_errors)
            connecting.add_metric([s.name], s.connecting)
            limit.add_metric([s.name], s.limit if s.limit < 1 << 40 else 0)
            up.add_metric([s.name, s.state], 1 if s.open else 0)
            for r in ROLES:
                role.add_metric([s.name, r], 1 if s.info.get("role") == r else 0)
            if (lag := s.info.get("lag")) is not None:
                lag_b.add_metric([s.name], lag["lag_bytes"])
                lag_s.add_metric([s.name], lag["lag_seconds"])
                if lag.get("applied_lsn"):
                    applied.add_metric([s.name], lsn_bytes(lag["applied_lsn"]))
            if s.last_check is not None:
                check.add_metric([s.name], s.last_check.duration)
                check_ok.add_metric([s.name], 1 if s.last_check.ok else 0)
        yield from (
            s_active,
            s_total,
            connecting,
            limit,
            b_in,
            b_out,
            connect,
            up,
            role,
            lag_b,
            lag_s,
            applied,
            check,
            check_ok,
        )
        sent = self._proxy.cancels
        routed, broadcast, idle = sent.routed, sent.broadcast, sent.idle
        cancels = CounterMetricFamily(
            "dbproxy_cancels", "Cancel requests delivered", labels=["how"]
        )
        cancels.add_metric(["to_session_server"], routed)
        cancels.add_metric(["to_every_server"], broadcast)
        cancels.add_metric(["nothing_running"], idle)
        yield cancels
        yield from self._pool_families()
        ssl_answers = self._proxy.ssl_answers
        forwarded, answered = ssl_answers.forwarded, ssl_answers.answered_for_server
        ssl = CounterMetricFamily(
            "dbproxy_ssl_requests",
            "SSLRequests forwarded, or answered 'N' as the server had just answered one",
            labels=["how"],
        )
        ssl.add_metric(["forwarded"], forwarded)
        ssl.add_metric(["answered_for_server"], answered)
        yield ssl
        yield CounterMetricFamily(
            "dbproxy_sessions_redialed",
            "Sessions sent on to another server: the first said nothing to the first packet",
            value=self._proxy.redials,
        )
        yield CounterMetricFamily(
            "dbproxy_startups_waited_on",
            "Sessions whose server said nothing to their first packet within timeouts.startup, "
            "with no other server to go to: waited on until it answers or is marked down",
            value=self._proxy.startups_waited_on,
        )
        queue = self._proxy.queue
        waiting, timeouts, refused = queue.lengths(), queue.timeouts, queue.refused
        abandoned, wait = queue.abandoned, queue.wait
        length = GaugeMetricFamily(
            "dbproxy_queue_length",
            "Sessions waiting for a slot (every fitting server at max_sessions)",
            labels=["listener"],
        )
        for name, count in waiting.items():
            length.add_metric([name], count)
        yield length
        yield wait.family("dbproxy_queue_wait_seconds", "How long sessions waited for a slot")
        yield CounterMetricFamily(
            "dbproxy_queue_timeouts",
            "Sessions refused with 53300: no slot within queue.timeout",
            value=timeouts,
        )
        yield CounterMetricFamily(
            "dbproxy_queue_refused",
            "Sessions refused with 53300: the queue was full",
            value=refused,
        )
        yield CounterMetricFamily(
            "dbproxy_queue_abandoned",
            "Sessions that left the queue because their client closed",
            value=abandoned,
        )

    def _pool_families(self) -> Iterator[Metric]:
        """Per (server, user, database) pool, as pgbouncer's SHOW POOLS."""
        labels = ["server", "user", "database"]
        gauges: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "active": GaugeMetricFamily(
                "dbproxy_pool_active", "Server connections lent to a client", labels=labels
            ),
            "idle": GaugeMetricFamily(
                "dbproxy_pool_idle", "Server connections idle in the pool", labels=labels
            ),
            "opening": GaugeMetricFamily(
                "dbproxy_pool_opening", "Server connections logging in", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "dbproxy_pool_waiting", "Clients waiting for a server connection", labels=labels
            ),
            "longest_wait_seconds": GaugeMetricFamily(
                "dbproxy_pool_longest_wait_seconds",
                "How long the longest-waiting client has waited (pgbouncer: maxwait)",
                labels=labels,
            ),
        }
        counters: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "served": CounterMetricFamily(
                "dbproxy_pool_lent", "Server connections lent to clients", labels=labels
            ),
            "wait_timeouts": CounterMetricFamily(
                "dbproxy_pool_wait_timeouts",
                "Clients refused with 53300 after wait_timeout",
                labels=labels,
            ),
            "login_failures": CounterMetricFamily(
                "dbproxy_pool_login_failures", "Server logins that failed", labels=labels
            ),
        }
        for pool in self._pools():
            values = [pool["server"], pool["user"], pool["database"]]
            for field, family in (*gauges.items(), *counters.items()):
                family.add_metric(values, pool[field])
        yield from gauges.values()
        yield from counters.values()
