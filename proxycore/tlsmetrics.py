"""/metrics of TLS listeners, for both proxies: handshakes, failures by reason,
versions, resumptions, handshakes under way, and each certificate's expiry (a
Unix time, as the blackbox and x509 exporters give it, so an alert is
``expiry - time() < 14 days``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .tls import TlsEnd


class TlsCollector(Collector):
    def __init__(self, prefix: str, listeners: Callable[[], Iterable[TlsEnd]]) -> None:
        self._prefix = prefix
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        p = self._prefix
        handshakes = CounterMetricFamily(
            f"{p}_tls_handshakes", "TLS handshakes finished", labels=["listener"]
        )
        resumed = CounterMetricFamily(
            f"{p}_tls_resumed", "Of those, sessions resumed", labels=["listener"]
        )
        failures = CounterMetricFamily(
            f"{p}_tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            labels=["listener", "reason"],
        )
        versions = CounterMetricFamily(
            f"{p}_tls_version", "Handshakes by TLS version", labels=["listener", "version"]
        )
        under_way = GaugeMetricFamily(
            f"{p}_tls_handshaking", "Handshakes under way", labels=["listener"]
        )
        expiry = GaugeMetricFamily(
            f"{p}_tls_certificate_expiry_timestamp_seconds",
            "When each certificate expires (Unix time)",
            labels=["listener", "file", "name"],
        )
        reload_failures = CounterMetricFamily(
            f"{p}_tls_reload_failures",
            "Certificate reloads refused (the old ones stayed)",
            labels=["listener"],
        )
        for end in self._listeners():
            name, counters, certs = end.name, end.counters, end.certs
            handshakes.add_metric([name], counters.handshakes)
            resumed.add_metric([name], counters.resumed)
            under_way.add_metric([name], counters.handshaking)
            for reason, n in sorted(counters.failures.items()):
                failures.add_metric([name, reason], n)
            for version, n in sorted(counters.versions.items()):
                versions.add_metric([name, version], n)
            for info in certs.infos:
                first = info.names[0] if info.names else ""
                expiry.add_metric([name, info.file, first], info.not_after)
            reload_failures.add_metric([name], certs.reload_failures)
        yield from (handshakes, resumed, failures, versions, under_way, expiry, reload_failures)
