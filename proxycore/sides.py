"""A proxy app's part in a supervised set of processes (proxycore/workers.py),
the same for lb and dbproxy: as the supervisor (``SupervisorSide``: its workers,
the one view of the servers it sends them, their deaths in /metrics) or as a
worker (``WorkerSide``: that view adopted, failure patterns reported, counters
answered).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .channel import Channel, Message
from .servers import Server, ServerGroups, ServerSet
from .workers import Inherited, Worker, WorkerHandler, Workers

log = logging.getLogger("balance.workers")


def worker_argv() -> list[str]:
    """The command a worker runs: this program as it was started (`python -m lb ...`)."""
    return [sys.executable, *sys.orig_argv[1:]]


class SupervisorSide:
    """A proxy app's part as a supervisor, the same for lb and dbproxy: its
    ServerSet is the one view of the servers (checks, ejections, admin changes),
    sent to every worker on each change and every second; failure patterns the
    workers report are decided here, against the panic threshold, once.

    ``share_limits``: each server's limit is divided among the workers (dbproxy:
    max_sessions guards the server's own max_connections, which the workers'
    sessions share); else each worker holds the whole limit (lb's max_conns, as
    nginx's max_conns without a shared zone)."""

    def __init__(
        self,
        servers: ServerSet | ServerGroups,
        listeners: dict[str, socket.socket],
        size: int,
        handler: WorkerHandler | None = None,
        tickets: bytes | None = None,
        share_limits: bool = False,
    ) -> None:
        self.servers = servers
        self._handler = handler
        self._share = size if share_limits else 1
        self.workers = Workers(
            worker_argv(), listeners, size, self._from_worker, self._state, tickets
        )
        self._ticker: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        await self.workers.start()
        self._tick()

    def _state(self) -> Message:
        return {"op": "state", "servers": self.servers.shared(), "share": self._share}

    def broadcast_state(self) -> None:
        self.workers.broadcast(self._state())

    def _tick(self) -> None:
        # Besides every change: a worker that missed one (just started, reloaded) catches up.
        self.broadcast_state()
        self._ticker = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _from_worker(self, worker: Worker, message: Message) -> Any:
        if message.get("op") == "eject":
            server = self.servers.get(message["server"])
            if server is not None:
                server.record_failure(message["why"], at_once=True)
            return None
        return None if self._handler is None else self._handler(worker, message)

    async def totals(self, fields: Callable[[list[Message]], None]) -> None:
        """Every worker's counters, handed to ``fields`` to sum (at scrape time)."""
        fields(await self.workers.gather({"op": "counters"}))

    async def stop(self, timeout: float) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await self.workers.stop(timeout)


class WorkerSide:
    """A proxy app's part as a worker: the supervisor's view of the servers is
    adopted as it comes, failure patterns are reported to it, the counters are
    sent when it asks. Its channel closing (the supervisor is gone) stops the worker."""

    def __init__(
        self,
        inherited: Inherited,
        servers: ServerSet | ServerGroups,
        counters: Callable[[], Message],
        stop: Callable[[], None],
        handler: Callable[[Message], Any] | None = None,
        adopted: Callable[[], None] | None = None,
    ) -> None:
        """``adopted``: called after each state from the supervisor (a replica's lag
        may have changed without a change of state)."""
        self.inherited = inherited
        self.servers = servers
        self._counters = counters
        self._stop = stop
        self._handler = handler
        self._adopted = adopted
        self.channel: Channel | None = None
        self._closing = False

    async def start(self) -> None:
        self.channel = await Channel.over(self.inherited.channel, self._from_supervisor, self._gone)
        self.servers.report_to(self._report)

    def ready(self) -> None:
        if self.channel is not None:
            self.channel.send({"op": "ready"})

    def _report(self, server: Server, why: str) -> None:
        if self.channel is not None:
            self.channel.send({"op": "eject", "server": server.key, "why": why})

    def _gone(self) -> None:
        if not self._closing:
            log.warning("the supervisor is gone; stopping")
            self._stop()

    def _from_supervisor(self, message: Message) -> Any:
        op = message.get("op")
        if op == "state":
            self.servers.adopt(message["servers"], message.get("share", 1))
            if self._adopted is not None:
                self._adopted()
            return None
        if op == "counters":
            return self._counters()
        return None if self._handler is None else self._handler(message)

    def close(self) -> None:
        self._closing = True
        if self.channel is not None:
            self.channel.close()


class WorkersCollector(Collector):
    """``<service>_worker_deaths_total{how}``: workers that died unasked, by how."""

    def __init__(self, service: str, supervisor: Callable[[], SupervisorSide | None]) -> None:
        self._service = service
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{self._service}_worker_deaths",
            "Workers that died unasked (each replaced), by signal or exit status",
            labels=["how"],
        )
        supervisor = self._supervisor()
        if supervisor is not None:
            for how, times in sorted(supervisor.workers.deaths.items()):
                family.add_metric([how], times)
        yield family
