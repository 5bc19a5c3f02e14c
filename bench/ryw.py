"""`python -m bench ryw`: read your own writes through the entry: register a user,
read it back at once.

``register_then_get`` runs that many times, 16 at a time, and counts what the
reads answered: a 404 is a user told they do not exist right after signing up.
With ``send_token`` each read sends back the consistency token its write got
(users_backend/consistency.py), as a client that keeps it does; without, it
reads as the seed's client would. `python -m bench` reports both per profile;
`python -m bench ryw` runs only this, on a local stack of each profile.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .procs import machine
from .stackrun import local_stack

CONCURRENCY = 16


async def register_then_get(
    entry: str, pairs: int, *, send_token: bool, concurrency: int = CONCURRENCY
) -> collections.Counter[int]:
    """The statuses of the reads of ``pairs`` register-then-get pairs through ``entry``."""
    statuses: collections.Counter[int] = collections.Counter()
    gate = asyncio.Semaphore(concurrency)

    async def pair(http: aiohttp.ClientSession, n: int) -> None:
        body = {
            "first_name": "Рыв",
            "second_name": f"Тест{n}",
            "birthdate": "1990-01-01",
            "password": "ryw-password",
        }
        async with gate:
            async with http.post(entry + "/user/register", json=body) as r:
                if r.status != 200:
                    statuses[-r.status] += 1  # the write itself failed: not a read's answer
                    return
                user_id = (await r.json())["user_id"]
                token = r.headers.get("X-Consistency-Token", "")
            headers = {"X-Consistency-Token": token} if send_token and token else {}
            async with http.get(f"{entry}/user/get/{user_id}", headers=headers) as r:
                statuses[r.status] += 1

    # No cookie jar: each pair carries its own token, or none at all.
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout) as http:
        await asyncio.gather(*(pair(http, n) for n in range(pairs)))
    return statuses


def measure(entry: str, pairs: int) -> dict[str, Any]:
    """Both ways, for a report: the pairs, and the reads not found."""
    out: dict[str, Any] = {"pairs": pairs}
    for key, send_token in (("with_token", True), ("without_token", False)):
        statuses = asyncio.run(register_then_get(entry, pairs, send_token=send_token))
        out[key] = {
            "not_found": statuses[404],
            "statuses": {str(k): v for k, v in statuses.items()},
        }
    return out


def run_ryw(
    pairs: int, *, profiles: tuple[str, ...], say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """``measure`` on a local stack of each profile (2,000 users), one after the other."""
    result: dict[str, Any] = {
        "benchmark": "read-your-writes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "concurrency": CONCURRENCY,
        "profiles": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-ryw-") as tmp:
        for profile in profiles:
            say(f"[{profile}] stack up; {pairs} register-then-get pairs each way")
            with local_stack(Path(tmp), profile=profile, users=2_000) as stack:
                result["profiles"][profile] = measure(stack.entry, pairs)
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "| profile | pairs | not found, with the token | not found, without |",
        "|---|---:|---:|---:|",
    ]
    for profile, r in result["profiles"].items():
        lines.append(
            f"| {profile} | {r['pairs']:,} | {r['with_token']['not_found']} | "
            f"{r['without_token']['not_found']} |"
        )
    return "\n".join(lines)
