"""The admin listener of both proxies: /metrics, /status, /status.html and runtime
drain/enable/disable of servers. Never on the public port; not on the hot path."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from .servers import Server

log = logging.getLogger("balance.admin")

StatusFn = Callable[[], dict[str, Any]]
FindServer = Callable[[str], Server | None]
ACTIONS = {"drain": "drain", "enable": "enabled", "disable": "disabled"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message, "code": status}, status=status)


def make_admin_app(
    title: str,
    status: StatusFn,
    find_server: FindServer,
    collectors: Iterable[Collector],
    on_admin_change: Callable[[Server, str], None] | None = None,
    refresh: Callable[[], Awaitable[None]] | None = None,
    reload_tls: Callable[[], dict[str, bool]] | None = None,
) -> web.Application:
    """``refresh``: brings the counters up to date before /metrics and /status
    answer (a supervisor sums its workers' then). ``reload_tls``: POST
    /tls/reload reads the certificate files again (listener: whether it took)."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)

    async def metrics(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def status_json(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        return web.json_response(status(), dumps=lambda d: json.dumps(d, ensure_ascii=False))

    async def status_html(_: web.Request) -> web.Response:
        return web.Response(text=STATUS_PAGE.replace("{{title}}", title), content_type="text/html")

    async def change(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        pool = request.match_info.get("pool")
        if pool is not None:
            name = f"{pool}/{name}"  # a server of that pool (names repeat across pools)
        if action not in ACTIONS:
            return _error(404, f"unknown action {action!r}; use {', '.join(ACTIONS)}")
        server = find_server(name)
        if server is None:
            return _error(404, f"no server named {name!r}")
        server.set_admin(ACTIONS[action])
        if on_admin_change is not None:
            on_admin_change(server, ACTIONS[action])
        log.warning("admin API: %s %s", action, name)
        return web.json_response(server.status())

    async def tls_reload(_: web.Request) -> web.Response:
        assert reload_tls is not None
        taken = reload_tls()
        log.warning("admin API: TLS certificates reloaded: %s", taken)
        return web.json_response({"reloaded": taken}, status=200 if all(taken.values()) else 409)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_json)
    app.router.add_get("/status.html", status_html)
    app.router.add_get("/", status_html)
    app.router.add_post("/servers/{name}/{action}", change)
    app.router.add_post("/pools/{pool}/servers/{name}/{action}", change)
    if reload_tls is not None:
        app.router.add_post("/tls/reload", tls_reload)
    return app


# A live page in the spirit of HAProxy's stats page: it polls /status once a second.
STATUS_PAGE = (Path(__file__).parent / "status.html").read_text()


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
