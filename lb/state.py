"""What a client connection and its exchanges see of lb (uvicorn's ServerState is
the model): the loop and its clock, the counters, the settings of the whole
server, whether it drains, and the routes. Plain data the Balancer fills in and
keeps current (a reload swaps the routes whole); the per-request classes never
see the Balancer, and nothing here imports them.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Final

from .accesslog import AccessLog
from .metrics import LbMetrics
from .routes import Route
from .routing import Router
from .settings import LbConfig


def _nothing() -> None:
    pass


class ClientSide:
    """What a client connection knows of the listener it came in on."""

    def __init__(self, https: bool, hsts: str, redirect: Route | None) -> None:
        self.https = https
        self.redirect = redirect  # the 308 every request gets (redirect_https)
        # ends a relayed response's status line: the HSTS header rides along free
        self.status_line_end = b"\r\n"
        if hsts:
            self.status_line_end = b"\r\nStrict-Transport-Security: " + hsts.encode() + b"\r\n"


PLAIN: Final = ClientSide(False, "", None)


class LbState:
    def __init__(self, config: LbConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Bound once: compiled code calls it without a method lookup per request.
        self.clock: Callable[[], float] = loop.time
        self.config = config
        self.metrics = LbMetrics()
        self.default_host = str(config.main_address).encode()
        self.draining = False
        # The open client connections (ClientConnection), for a drain and for a
        # server going down; and what to call when one closes.
        self.clients: set[object] = set()
        self.client_closed: Callable[[], None] = _nothing
        # The routes, and how a request finds its own (Router.match gives the
        # index); ``unrouted`` answers a request no route takes (404).
        self.router = Router(())
        self.routes: list[Route] = []
        self.unrouted: Route | None = None
        # The request headers something reads (lowercase names: a route's
        # headers, a limit's key, the access log's Referer and User-Agent);
        # None when nothing does, the usual case: then none is kept.
        self.watch: frozenset[bytes] | None = None
        # The largest body any route takes (each route checks its own).
        self.max_body_bytes = config.limits.max_body_bytes
        self.access: AccessLog | None = None
        # Whose X-Forwarded-For a rate limit's "forwarded" key believes.
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in config.trusted_proxies]

    def use_routes(self, config: LbConfig, routes: list[Route], unrouted: Route) -> None:
        """``routes`` (built from ``config``) are the ones requests take from now
        on; those already on their way keep theirs."""
        self.config = config
        self.router = Router(config.routes)
        self.routes = routes
        self.unrouted = unrouted
        watched = set(self.router.header_names)
        for route in routes:
            if route.limiter is not None and route.limiter.header:
                watched.add(route.limiter.header)
        if self.access is not None:
            watched |= {b"referer", b"user-agent"}
        self.watch = frozenset(watched) if watched else None
        self.max_body_bytes = max(
            [config.limits.max_body_bytes, *(r.max_body_bytes for r in routes)]
        )
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in config.trusted_proxies]
