"""Load for lb tests on real processes: keep-alive clients that record what they
saw, and what lb and the test upstreams say they counted."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field

from tests.lbctl import Lb, Upstream
from tests.rawhttp import get, read_response


@dataclass
class Load:
    """What keep-alive clients saw: each request's status (0: no full answer) and time."""

    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    refused: int = 0  # connects refused (lb no longer listening): nothing was sent

    @property
    def failed(self) -> int:
        return sum(s != 200 for s in self.statuses)


async def keepalive_clients(port: int, clients: int, seconds: float, path: str = "/") -> Load:
    """``clients`` connections, each sending GETs one after another for ``seconds``;
    a response that says Connection: close ends its connection, and the client
    connects again (a refused connect stops it)."""
    load = Load()
    until = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                load.refused += 1
                return
            try:
                while time.monotonic() < until:
                    sent = time.monotonic()
                    writer.write(get(path))
                    try:
                        response = await asyncio.wait_for(read_response(reader), 15)
                    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                        load.statuses.append(0)
                        load.latencies.append(time.monotonic() - sent)
                        break
                    load.statuses.append(response.status)
                    load.latencies.append(time.monotonic() - sent)
                    if response.header("connection") == "close":
                        break
            finally:
                writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return load


def metric(lb: Lb, name: str) -> float:
    with urllib.request.urlopen(lb.admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def requests_seen(upstream: Upstream) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"http://{upstream.address}/seen", timeout=5) as r:
        return json.loads(r.read())
