"""Routes as requests use them: a route's pool (or fixed answer), the settings its
requests go by (the pool's, with the route's overrides), its rate limit and its
counters; built from the configuration by ``build_routes``, again on a reload
(a route keeps its counters and its limit's buckets by name)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .metrics import STATUS_CLASSES
from .pools import Pool
from .ratelimit import Limiter, shared_path
from .settings import LbConfig, RouteConfig, Timeouts


class Route:
    __slots__ = (
        "answer",
        "by_class",
        "config",
        "hedge_after",
        "limited",
        "limiter",
        "max_body_bytes",
        "name",
        "name_bytes",
        "pool",
        "pool_name",
        "timeouts",
        "tries",
        "unrouted",
    )

    def __init__(
        self,
        config: RouteConfig,
        pool: Pool,
        lb: LbConfig,
        limiter: Limiter | None,
        unrouted: bool = False,
    ) -> None:
        self.name = config.name
        self.name_bytes = config.name.encode()  # (for the access log)
        self.unrouted = unrouted  # what a request no route takes gets: 404
        self.config = config
        # (a route with a fixed answer has the pool of no servers: never asked)
        self.pool = pool
        self.pool_name = pool.name.encode()
        self.answer = config.answer
        base = pool.config
        self.tries = config.tries or base.tries
        hedge = config.hedge_after
        self.hedge_after = hedge if hedge is not None else base.hedge_after
        self.timeouts: Timeouts = dataclasses.replace(base.timeouts, **dict(config.timeouts))
        self.max_body_bytes = config.max_body_bytes or lb.limits.max_body_bytes
        self.limiter = limiter
        self.by_class = [0, 0, 0, 0, 0, 0]  # answers by status // 100; 0: none
        self.limited = 0  # requests refused by the limit

    def status(self) -> dict[str, Any]:
        """For /status and its page."""
        rc = self.config
        match = {
            "hosts": list(rc.hosts),
            "path": f"{rc.path_kind} {rc.path}" if rc.path_kind else "",
            "methods": sorted(rc.methods),
            "headers": dict(rc.headers),
        }
        return {
            "pool": self.pool.name if self.answer is None else None,
            "answer": self.answer.status if self.answer is not None else None,
            "match": {k: v for k, v in match.items() if v},
            "responses": dict(zip(STATUS_CLASSES, self.by_class, strict=True)),
            "limited": self.limited,
            "limit": None if rc.limit is None else dataclasses.asdict(rc.limit),
        }


def build_routes(
    config: LbConfig,
    pools: Mapping[str, Pool],
    answers: Pool,
    old: Sequence[Route] = (),
    shared_by: int = 0,
) -> list[Route]:
    """``config``'s routes over ``pools`` (``answers``: the empty pool of the
    routes that answer themselves); ``old``: the routes before a reload;
    ``shared_by``: the supervisor's PID when its workers share the limits' buckets."""
    before = {r.name: r for r in old}
    routes = []
    for rc in config.routes:
        was = before.get(rc.name)
        limiter = None
        if rc.limit is not None:
            if was is not None and was.limiter is not None and was.limiter.config == rc.limit:
                limiter = was.limiter
            else:
                path: Path | None = shared_path(shared_by, rc.name) if shared_by else None
                limiter = Limiter(rc.limit, path)
        route = Route(rc, pools[rc.pool] if rc.pool else answers, config, limiter)
        if was is not None:
            route.by_class = was.by_class
            route.limited = was.limited
        routes.append(route)
    for route in old:
        if route.limiter is not None and all(r.limiter is not route.limiter for r in routes):
            route.limiter.close()
    return routes


def forwarded_client(
    client_ip: bytes,
    xff: bytes | None,
    trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bytes:
    """The client behind trusted proxies (nginx's real_ip with set_real_ip_from
    and real_ip_recursive): X-Forwarded-For read from the right, past every
    address of a trusted network; the peer itself when it is not trusted."""

    def is_trusted(address: bytes) -> bool:
        try:
            ip = ipaddress.ip_address(address.decode().strip())
        except ValueError:
            return False
        return any(ip in n for n in trusted)

    if not xff or not is_trusted(client_ip):
        return client_ip
    hops = [h.strip() for h in xff.split(b",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else client_ip


def expand_location(template: str, host: bytes, target: bytes) -> bytes:
    """A fixed answer's Location with nginx's ``$host`` (the request's host,
    without its port) and ``$request_uri`` (its target as sent) filled in:
    ``https://$host$request_uri`` sends a client to the same place over HTTPS."""
    location = template.encode()
    if b"$" not in location:
        return location
    name = host
    if not host.startswith(b"["):
        name = host.partition(b":")[0]
    elif b"]" in host:
        name = host[: host.index(b"]") + 1]
    return location.replace(b"$request_uri", target).replace(b"$host", name.lower())
