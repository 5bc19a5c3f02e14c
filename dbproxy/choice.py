"""Which server a session of a listener goes to: the listener's role filter
(routing.py) over the servers' state, the balancing policy, and the servers'
session slots. Busy replicas are waited for, not spilled onto the primary: ro
falls back to the primary only when no replica fits at all (as HAProxy uses a
backup only when the others are down)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from proxycore.balancing import Policy, pick
from proxycore.servers import Server, ServerSet

from . import routing
from .settings import ReadOnlyRouting


class _First(Policy):
    """A policy that moves no state: for asking whether any server fits."""

    def choose(self, candidates: Sequence[Server]) -> Server:
        return candidates[0]


_FIRST = _First()


def _has_room(server: Server) -> bool:
    return server.active < server.limit


def _with_room(accept: routing.Accept | None, room: bool) -> routing.Accept | None:
    if not room:
        return accept
    if accept is None:
        return _has_room
    return lambda s: accept(s) and s.active < s.limit


class Choice:
    def __init__(
        self, servers: ServerSet, limits: Callable[[], ReadOnlyRouting], policy: Policy
    ) -> None:
        self.servers = servers
        self._limits = limits
        self.policy = policy

    def choose(self, listener: str, tried: Collection[Server], room: bool = False) -> Server | None:
        """The server for a new session of ``listener``, not one of ``tried``;
        ``room``: only among those below their max_sessions."""
        limits = self._limits()
        order = self.servers.order
        accept = routing.accept_for(listener, limits, fallback=False)
        server = pick(order, self.policy, tried, _with_room(accept, room))
        if server is None and listener == "ro" and limits.primary_fallback:
            if room and pick(order, _FIRST, tried, accept) is not None:
                return None
            fallback = routing.accept_for("ro", limits, fallback=True)
            server = pick(order, self.policy, tried, _with_room(fallback, room))
        return server

    def fits(self, server: Server, listener: str) -> bool:
        """Whether a pooled session of ``listener`` may go on using ``server`` (asked
        at each transaction: the common answers without listing the servers)."""
        if not server.takes_traffic():
            return False
        if listener == "any":
            return True
        primary = routing.is_primary(server)
        if listener == "rw":
            return primary
        if not primary:
            return server.info.get("role") == "replica" and routing.lag_ok(server, self._limits())
        return server in self.fitting(listener)  # the primary, as ro's fallback

    def fitting(self, listener: str) -> list[Server]:
        """The servers a new session of ``listener`` may go to now, as choose sees them."""
        limits = self._limits()
        accept = routing.accept_for(listener, limits, fallback=False)
        fits = [s for s in self.servers if s.takes_traffic() and (accept is None or accept(s))]
        if not fits and listener == "ro" and limits.primary_fallback:
            fallback = routing.accept_for("ro", limits, fallback=True)
            fits = [
                s
                for s in self.servers
                if s.takes_traffic() and fallback is not None and fallback(s)
            ]
        return fits

    def fitting_replica(self) -> Server | None:
        """A replica that fits ro now, if any."""
        accept = routing.accept_for("ro", self._limits(), fallback=False)
        return pick(self.servers.order, _FIRST, [], accept)

    def may_route(self, listener: str) -> list[Server]:
        """Every server ``listener`` may send to, up or not (where a cancel no one
        knows the key of goes)."""
        limits = self._limits()
        accept = routing.accept_for(listener, limits, fallback=False)
        fallback = routing.accept_for(listener, limits, fallback=True)
        return [
            s
            for s in self.servers
            if accept is None or accept(s) or (fallback is not None and fallback(s))
        ]
