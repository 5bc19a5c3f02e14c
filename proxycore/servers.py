"""Servers and their state: admin state, active-check health, passive ejection.

A server takes new traffic when it is enabled (not drained or disabled), its
checks say up, and passive failures have not taken it out. Every change of that
picture is logged once, when it happens, never on every check.

Passive ejection looks for a pattern, not an incident (Envoy's outlier
detection): ``max_fails`` failures in a row with no success between them, or
one refused connect (nothing listens: the process is gone). A timeout alone
may be the proxy's own burst, so the caller decides whether it counts. And it
never takes the share of servers taking traffic below ``panic_threshold``:
passive evidence alone does not eject the last servers up (the checks still
can).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from .config import Address
from .histogram import BUCKETS, Histogram

log = logging.getLogger("balance.servers")

_NO_LIMIT: Final = 1 << 62
# A server's counters that traffic moves: each worker has its own, the
# supervisor sums them (proxycore/counters.py).
TRAFFIC_FIELDS: Final = (
    "active",
    "total",
    "by_class",
    "failures_total",
    "connect_errors",
    "connecting",
    "bytes_in",
    "bytes_out",
    "latency",
)

ADMIN_STATES: Final = ("enabled", "drain", "disabled")


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server as the configuration names it."""

    name: str
    address: Address
    weight: int = 1
    backup: bool = False
    max_conns: int = 0  # requests (lb) or sessions (dbproxy) at once; 0: no limit


@dataclass(frozen=True, slots=True)
class HealthParams:
    """Active checks (rise/fall, as HAProxy); passive ejection: ``max_fails`` in a
    row (Envoy's consecutive_gateway_failure), out for ``fail_timeout`` when no
    checks run (nginx), never below ``panic_threshold`` percent of the servers
    up (Envoy's healthy_panic_threshold)."""

    rise: int = 2
    fall: int = 2
    max_fails: int = 5
    fail_timeout: float = 10.0
    checks_enabled: bool = True
    panic_threshold: int = 50


@dataclass(slots=True)
class CheckRecord:
    ok: bool
    detail: str
    duration: float
    at: float  # time.time()
    timed_out: bool = False  # no answer at all within the timeout (a frozen server's sign)


class Server:
    """One upstream: identity, state, and the plain-integer counters read at scrape time."""

    def __init__(self, spec: ServerSpec, params: HealthParams) -> None:
        self.spec = spec
        self.params = params
        self.admin = "enabled"
        self.healthy = True  # optimistic start, as nginx and HAProxy: the first checks correct it
        self.weight = spec.weight
        # Whether it takes traffic, kept up to date on every change so that the
        # balancer reads one attribute per server per request.
        self.open = True
        self._rise_count = 0
        self._fall_count = 0
        self.fails_in_a_row = 0
        self.passive_until = 0.0  # monotonic time; out of rotation until then (no active checks)
        self.passive_out = False
        self.state_since = time.time()
        self.last_check: CheckRecord | None = None
        self.info: dict[str, Any] = {}  # extra facts from checks (dbproxy: role, lag)
        # Whether passive ejection may take this server out now (ServerSet: the
        # panic threshold); None: always.
        self.may_eject: Callable[[Server], bool] | None = None
        # In a worker: a failure pattern is reported to the supervisor, which
        # decides for every worker alike (its state comes back through adopt).
        self.report: Callable[[Server, str], None] | None = None
        self.limit = spec.max_conns or _NO_LIMIT
        self.connecting = 0  # connects to it in progress
        # counters
        self.active = 0
        self.total = 0
        self.by_class = [0, 0, 0, 0, 0, 0]  # index = status // 100; 0 = no answer
        self.failures_total = 0
        self.connect_errors = 0
        self.checks_total = 0
        self.checks_failed = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # lb: the time of each request it answered (the status page's p99 of the
        # last seconds comes from the difference of two readings)
        self.latency = Histogram()
        # balancing state: round robin's; the peak-EWMA latency of its attempts
        # (seconds) and when it last moved (proxycore/balancing.py observe)
        self.rr_current = 0
        self.ewma = 0.0
        self.ewma_at = 0.0
        # Told of every change of state (dbproxy closes a down server's sessions).
        self.on_change: Callable[[Server], None] | None = None
        # How the supervisor and its workers name it: its name, or "pool/name"
        # when several pools' servers travel together (ServerGroups).
        self.key = spec.name

    @property
    def name(self) -> str:
        return self.spec.name

    def set_spec(self, spec: ServerSpec, params: HealthParams) -> None:
        self.spec = spec
        self.weight = spec.weight
        self.limit = spec.max_conns or _NO_LIMIT
        self.params = params
        self._refresh()

    def _refresh(self) -> None:
        was_open = self.open
        self.open = self.admin == "enabled" and self.healthy and not self.passive_out
        if self.open and not was_open:
            # Back in rotation: what it cost before it went out (a failure's peak,
            # a freeze) says nothing of it now; it starts again as a new server.
            self.ewma = 0.0

    def takes_traffic(self, now: float | None = None) -> bool:
        if self.admin != "enabled" or not self.healthy:
            return False
        if self.passive_out:
            if self.params.checks_enabled:
                return False
            # nginx semantics without active checks: try again after fail_timeout
            if (time.monotonic() if now is None else now) < self.passive_until:
                return False
            self.passive_out = False
            self._refresh()
        return True

    @property
    def state(self) -> str:
        """For people: UP, DOWN, DRAIN, MAINT (disabled), as HAProxy's stats page says it."""
        if self.admin == "disabled":
            return "MAINT"
        if self.admin == "drain":
            return "DRAIN"
        if not self.healthy or self.passive_out:
            return "DOWN"
        return "UP"

    def _changed(self, why: str) -> None:
        self._refresh()
        self.state_since = time.time()
        log.warning("server %s is now %s (%s)", self.name, self.state, why)
        if self.on_change is not None:
            self.on_change(self)

    def record_check(self, record: CheckRecord) -> None:
        self.last_check = record
        self.checks_total += 1
        if record.ok:
            self._fall_count = 0
            if self.healthy and not self.passive_out:
                return
            self._rise_count += 1
            if self._rise_count >= self.params.rise:
                self._rise_count = 0
                self.healthy = True
                self.passive_out = False
                self.fails_in_a_row = 0
                self._changed(f"{self.params.rise} check(s) passed: {record.detail}")
        else:
            self.checks_failed += 1
            self._rise_count = 0
            if not self.healthy:
                return
            self._fall_count += 1
            if self._fall_count >= self.params.fall:
                self._fall_count = 0
                self.healthy = False
                self._changed(f"{self.params.fall} check(s) failed: {record.detail}")

    def mark_down(self, why: str) -> None:
        """Down now, on evidence stronger than one failed check (a gray failure
        confirmed outside the checks' schedule); the checks bring it back (rise)."""
        if not self.healthy:
            return
        self.healthy = False
        self._fall_count = 0
        self._rise_count = 0
        self._changed(why)

    def record_failure(self, why: str, now: float | None = None, *, at_once: bool = False) -> None:
        """A passive failure (a connect refused, reset or timed out, a configured
        status): ``max_fails`` in a row take the server out; ``at_once`` (a
        refused connect: nothing listens there) takes it out now."""
        self.failures_total += 1
        params = self.params
        if params.max_fails <= 0 or self.passive_out:
            return
        self.fails_in_a_row += 1
        if not at_once and self.fails_in_a_row < params.max_fails:
            return
        if self.report is not None:
            self.fails_in_a_row = 0
            self.report(self, why)
            return
        if self.may_eject is not None and not self.may_eject(self):
            if self.fails_in_a_row == params.max_fails or at_once:
                log.warning(
                    "server %s failed (%s) but stays in: ejecting it would leave fewer than "
                    "%d%% of the servers up (panic threshold)",
                    self.name,
                    why,
                    params.panic_threshold,
                )
            return
        count = self.fails_in_a_row
        self.fails_in_a_row = 0
        self.passive_out = True
        self.passive_until = (time.monotonic() if now is None else now) + params.fail_timeout
        self._rise_count = 0
        self._changed(f"{count} failure(s) in a row: {why}")

    def connect_failed(self, exc: BaseException, what: str = "connect") -> None:
        """Passive evidence from a failed connect (``what``: or the TLS after it),
        its ``connecting`` count already taken back: a refused one (nothing
        listens) takes the server out at once; a timed-out one counts only when it
        was the server's only connect in flight (with others it may be the proxy's
        own burst, not a dead server: the checks settle that); any other counts."""
        self.connect_errors += 1
        if isinstance(exc, ConnectionRefusedError):
            self.record_failure(f"{what} refused: {exc}", at_once=True)
        elif not isinstance(exc, TimeoutError):
            self.record_failure(f"{what} failed: {exc}")
        elif self.connecting == 0:
            self.record_failure(f"{what} timed out")

    def record_success(self) -> None:
        """An answer: failures are counted in a row, so the count starts again."""
        self.fails_in_a_row = 0

    def shared(self) -> dict[str, Any]:
        """The state every worker must see alike (the supervisor's, sent to each)."""
        return {
            "healthy": self.healthy,
            "admin": self.admin,
            "passive_out": self.passive_out,
            "passive_until": self.passive_until,
            "limit": self.limit,
            "state_since": self.state_since,
            "last_check": None if self.last_check is None else dataclasses.asdict(self.last_check),
            "info": self.info,
        }

    def adopt(self, state: dict[str, Any], share: int = 1) -> None:
        """A worker takes the supervisor's view; a change of state reaches on_change
        (lb moves the requests waiting on a server gone down; dbproxy closes its
        sessions) as it would where the change was made. Logged there, not here.
        ``share``: the limit is the server's, held by that many workers, each
        its part (at least one)."""
        before = (self.state, self.open)
        self.healthy = state["healthy"]
        self.admin = state["admin"]
        self.passive_out = state["passive_out"]
        self.passive_until = state["passive_until"]
        limit = state["limit"]
        self.limit = limit if share <= 1 or limit >= _NO_LIMIT else max(1, limit // share)
        self.state_since = state["state_since"]
        check = state["last_check"]
        self.last_check = None if check is None else CheckRecord(**check)
        self.info = state["info"]
        self._refresh()
        if (self.state, self.open) != before and self.on_change is not None:
            self.on_change(self)

    def set_admin(self, state: str) -> None:
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state {state!r}")
        if state != self.admin:
            self.admin = state
            self._changed(f"set to {state} by the admin API")

    def status(self) -> dict[str, Any]:
        check = self.last_check
        return {
            "name": self.name,
            "address": str(self.spec.address),
            "weight": self.weight,
            "backup": self.spec.backup,
            "state": self.state,
            "admin": self.admin,
            "healthy": self.healthy,
            "passive_out": self.passive_out,
            "in_state_seconds": round(time.time() - self.state_since, 3),
            "active": self.active,
            "total": self.total,
            "responses": {f"{i}xx": n for i, n in enumerate(self.by_class) if i},
            "failures": self.failures_total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "latency": {"bounds": BUCKETS, "counts": self.latency.counts},
            "connecting": self.connecting,
            "limit": self.limit if self.limit < _NO_LIMIT else None,
            "connect_errors": self.connect_errors,
            "last_check": None
            if check is None
            else {
                "ok": check.ok,
                "detail": check.detail,
                "duration_ms": round(check.duration * 1000, 2),
                "seconds_ago": round(time.time() - check.at, 3),
            },
            **self.info,
        }


@dataclass
class ServerSet:
    """The servers of one pool, in configuration order; reload keeps each one's state."""

    params: HealthParams
    _servers: dict[str, Server] = field(default_factory=dict)
    _order: list[Server] = field(default_factory=list)
    # In a worker: where failure patterns go (Server.report); set before update.
    report: Callable[[Server, str], None] | None = None

    @classmethod
    def of(cls, specs: Iterable[ServerSpec], params: HealthParams) -> ServerSet:
        result = cls(params)
        result.update(specs, params)
        return result

    def __iter__(self) -> Iterator[Server]:
        return iter(self._order)

    @property
    def order(self) -> list[Server]:
        """The servers in configuration order (for ``balancing.pick``: compiled, a
        list is walked by index where an iterable needs an iterator). Not to be
        changed: a reload puts a new list in its place."""
        return self._order

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, name: str) -> Server | None:
        return self._servers.get(name)

    def shared(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.shared() for s in self._order}

    def report_to(self, report: Callable[[Server, str], None]) -> None:
        """A worker's servers: failure patterns go to ``report`` (the supervisor)."""
        self.report = report
        for server in self._order:
            server.report = report

    def adopt(self, states: dict[str, dict[str, Any]], share: int = 1) -> None:
        for name, state in states.items():
            server = self._servers.get(name)
            if server is not None:  # one this worker does not know yet: its reload is due
                server.adopt(state, share)

    def update(
        self, specs: Iterable[ServerSpec], params: HealthParams
    ) -> tuple[list[Server], list[Server]]:
        """Apply a new list; (added, removed). A kept server keeps its health and counters."""
        self.params = params
        new: dict[str, Server] = {}
        added = []
        for spec in specs:
            server = self._servers.get(spec.name)
            if server is None or server.spec.address != spec.address:
                server = Server(spec, params)
                added.append(server)
            else:
                server.set_spec(spec, params)
            new[spec.name] = server
        removed = [s for name, s in self._servers.items() if new.get(name) is not s]
        self._servers = new
        self._order = list(new.values())
        for server in self._order:
            server.may_eject = self._may_eject
            server.report = self.report
        return added, removed

    def _may_eject(self, server: Server) -> bool:
        """The panic threshold: passive ejection never leaves fewer than
        ``panic_threshold`` percent of the primaries taking traffic."""
        primaries = [s for s in self._order if not s.spec.backup]
        if server.spec.backup or not primaries:
            return True
        left = sum(1 for s in primaries if s is not server and s.takes_traffic())
        return left * 100 >= len(primaries) * self.params.panic_threshold


class ServerGroups:
    """Several pools' server sets, seen by a supervisor and its workers as one:
    each server by its key, "pool/name" (a name is unique within its pool only).
    The same calls as a ServerSet's (shared, adopt, get, report_to)."""

    def __init__(self) -> None:
        self.sets: dict[str, ServerSet] = {}
        self.report: Callable[[Server, str], None] | None = None

    def set(self, pool: str, servers: ServerSet) -> None:
        """``servers`` are ``pool``'s (again, after a reload changed them)."""
        self.sets[pool] = servers
        for server in servers:
            server.key = f"{pool}/{server.name}"
        if self.report is not None:
            servers.report_to(self.report)

    def drop(self, pool: str) -> None:
        self.sets.pop(pool, None)

    def __iter__(self) -> Iterator[Server]:
        return (server for servers in self.sets.values() for server in servers)

    def shared(self) -> dict[str, dict[str, Any]]:
        return {server.key: server.shared() for server in self}

    def adopt(self, states: dict[str, dict[str, Any]], share: int = 1) -> None:
        for key, state in states.items():
            server = self.get(key)
            if server is not None:  # one this worker does not know yet: its reload is due
                server.adopt(state, share)

    def get(self, key: str) -> Server | None:
        pool, _, name = key.partition("/")
        servers = self.sets.get(pool)
        return None if servers is None else servers.get(name)

    def report_to(self, report: Callable[[Server, str], None]) -> None:
        self.report = report
        for servers in self.sets.values():
            servers.report_to(report)
