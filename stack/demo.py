"""A short walk through the API of the running stack, printed for a person, then
(with proxies in front) the drill, live (stack/livedrill.py), and where to look next."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from . import livedrill
from .errors import StackError
from .state import StackState
from .topology import Topology


def entry_url(topology: Topology) -> str:
    """Where clients talk to the service: the entry proxy, or backend 1 without proxies."""
    port = topology.ports.backend_1 if topology.proxies == "none" else topology.ports.entry
    return f"http://127.0.0.1:{port}"


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        await response.read()
        return response.status


async def _over_https(
    http: aiohttp.ClientSession, topology: Topology, path: str, say: Callable[[str], None]
) -> None:
    """The same read over https, the certificate checked against the stack's CA."""
    context = ssl.create_default_context(cafile=str(topology.tls_dir / "ca.pem"))
    url = f"https://localhost:{topology.ports.entry_tls}{path}"
    async with http.get(url, ssl=context) as response:
        await response.read()
        say(
            f"GET {url} -> {response.status} over TLS, checked against the stack's CA "
            f"(curl --cacert {topology.tls_dir / 'ca.pem'} {url})"
        )


async def run(state_dir: Path, say: Callable[[str], None]) -> None:
    state = StackState.load(state_dir)
    if state is None:
        raise StackError("no stack is up; run `python -m stack up` first")
    base = entry_url(state.topology)
    say(f"talking to {base}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def call(method: str, path: str, **kwargs: object) -> object:
            async with http.request(method, base + path, **kwargs) as response:  # type: ignore[arg-type]
                body = await response.json()
                shown = json.dumps(body, ensure_ascii=False)
                say(f"{method} {path} -> {response.status} {shown[:300]}")
                return body

        user = {
            "first_name": "Иван",
            "second_name": "Петров",
            "birthdate": "1990-05-17",
            "biography": "Интересы: шахматы, походы",
            "city": "Казань",
            "password": "s3cret-pass",
        }
        created = await call("POST", "/user/register", json=user)
        user_id = created["user_id"]  # type: ignore[index]
        await call("POST", "/login", json={"id": user_id, "password": user["password"]})
        # Reads go to the replica: a read right after the write may come before
        # replication delivers the row. Show that, instead of hiding it.
        started = time.monotonic()
        while (await status_of(http, f"{base}/user/get/{user_id}")) == 404:
            if time.monotonic() - started > 5:
                break
            await asyncio.sleep(0.01)
        lag_ms = 1000 * (time.monotonic() - started)
        say(f"(the replica had the new user {lag_ms:.0f} ms after login)")
        await call("GET", f"/user/get/{user_id}")
        await call(
            "GET", "/user/search", params={"first_name": "Ив", "last_name": "Пе", "limit": "3"}
        )
        await call("GET", "/user/get/not-a-uuid")
        topology = state.topology
        if topology.proxies != "none":
            await _over_https(http, topology, f"/user/get/{user_id}", say)

    if topology.proxies == "none":
        return
    await livedrill.run(state_dir, base, say)
    say("")
    say("where to look next:")
    say(
        f"  status pages   http://127.0.0.1:{topology.ports.lb_admin}/status.html (the HTTP proxy),"
        f" http://127.0.0.1:{topology.ports.dbproxy_admin}/status.html (the database proxy)"
    )
    say(
        f"  metrics        http://127.0.0.1:{topology.ports.lb_admin}/metrics,"
        f" http://127.0.0.1:{topology.ports.dbproxy_admin}/metrics, scraped by the stack's"
        f" Prometheus: http://127.0.0.1:{topology.ports.prometheus}/targets"
    )
    say("  the comparison .venv/bin/python -m bench --quick (both profiles, a few minutes)")
    say("  the docs       README.md, docs/")
    say("  stop it all    make down")
