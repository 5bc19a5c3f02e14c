"""A [[route]] table of lb's file, read and checked (lb/config.py reads the rest).

[[route]]
name = "users"                    # default: route-N
host = "api.example.com"          # or a list; "*.example.com", "www.example.*"; none: every host
path_prefix = "/user/"            # or path (exact), path_prefix_first (nginx's ^~), path_regex
methods = ["GET", "HEAD"]         # none: every method
headers = { X-Canary = "1" }      # exact values; none: any headers
pool = "users"                    # or: return = 301 and location = "https://..." (or body)
tries = 2                         # overrides of the pool's, for this route's requests
hedge_after = "200ms"
max_body_bytes = "1m"
[route.timeouts]                  # connect, first_byte, upstream_idle
first_byte = "2s"
[route.limit]                     # nginx's limit_req
rate = "50r/s"                    # or "600r/m"
burst = 20
nodelay = true
key = "client"                    # or "forwarded" (trusted_proxies), or "header:X-Api-Key"
status = 429                      # or 503, nginx's default
"""

from __future__ import annotations

import re

from proxycore.config import ConfigError, Section

from .settings import UPSTREAM_TIMEOUTS, AnswerConfig, LimitConfig, RouteConfig

PATH_KINDS = {
    "path": "exact",
    "path_prefix": "prefix",
    "path_prefix_first": "prefix_first",
    "path_regex": "regex",
}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(\.\*)?(:[0-9]{1,5})?")
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*r/(s|m)\s*")


def read_route(s: Section, index: int, pools: list[str]) -> RouteConfig:
    name = s.string("name", f"route-{index + 1}")
    hosts = _hosts(s)
    kinds = [key for key in PATH_KINDS if s.has(key)]
    if len(kinds) > 1:
        raise ConfigError(f"{s.where(kinds[1])}: a route has one of {', '.join(PATH_KINDS)}")
    path_kind, path = "", ""
    if kinds:
        path = s.string(kinds[0], "")
        path_kind = PATH_KINDS[kinds[0]]
        if path_kind == "regex":
            try:
                re.compile(path)
            except re.error as exc:
                raise ConfigError(f"{s.where(kinds[0])}: not a regular expression: {exc}") from None
        elif not path.startswith("/"):
            raise ConfigError(f"{s.where(kinds[0])}: must start with '/', got {path!r}")
    methods = s.raw("methods", [])
    if not isinstance(methods, list) or not all(
        isinstance(m, str) and _TOKEN.fullmatch(m) for m in methods
    ):
        raise ConfigError(f"{s.where('methods')}: expected a list of methods, e.g. ['GET']")
    headers = s.raw("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and _TOKEN.fullmatch(k) and isinstance(v, str)
        for k, v in headers.items()
    ):
        raise ConfigError(f"{s.where('headers')}: expected a table of names and values")
    pool = s.string("pool", "")
    answer = _answer(s)
    if bool(pool) == (answer is not None):
        raise ConfigError(f"{s.where('pool')}: a route has a pool, or a `return`, not both")
    if pool and pool not in pools:
        raise ConfigError(f"{s.where('pool')}: no pool {pool!r}; pools: {', '.join(pools)}")
    tries = s.integer("tries", 0, minimum=1, maximum=100) if s.has("tries") else None
    hedge_after = None
    if s.has("hedge_after"):
        raw = s.raw("hedge_after")
        hedge_after = 0.0 if raw == "off" else s.duration("hedge_after", 0.0)
    t = s.section("timeouts")
    timeouts = tuple((k, t.duration(k, 0.0)) for k in UPSTREAM_TIMEOUTS if t.has(k))
    t.done()
    max_body = s.size("max_body_bytes", 0) if s.has("max_body_bytes") else None
    limit = _limit(s.section("limit")) if s.has("limit") else None
    s.done()
    return RouteConfig(
        name=name,
        hosts=hosts,
        path_kind=path_kind,
        path=path,
        methods=frozenset(m.upper() for m in methods),
        headers=tuple((k.lower(), v) for k, v in headers.items()),
        pool=pool,
        answer=answer,
        tries=tries,
        hedge_after=hedge_after,
        timeouts=timeouts,
        max_body_bytes=max_body,
        limit=limit,
        line=s.line,
    )


def _hosts(s: Section) -> tuple[str, ...]:
    raw = s.raw("host", [])
    hosts = [raw] if isinstance(raw, str) else raw
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ConfigError(f"{s.where('host')}: expected a host name or a list of them")
    for host in hosts:
        if not _HOST.fullmatch(host.lower()) or (host.startswith("*") and host.endswith("*")):
            raise ConfigError(
                f"{s.where('host')}: expected a name, '*.example.com' or 'www.example.*', "
                f"got {host!r}"
            )
    return tuple(h.lower() for h in hosts)


def _answer(s: Section) -> AnswerConfig | None:
    if not s.has("return"):
        for key in ("location", "body"):
            if s.has(key):
                raise ConfigError(f"{s.where(key)}: only with `return`")
        return None
    status = s.integer("return", 0, minimum=200, maximum=599)
    location = s.string("location", "")
    body = s.string("body", "")
    if 300 <= status < 400 and not location:
        raise ConfigError(f"{s.where('location')}: a redirect (`return = {status}`) needs one")
    return AnswerConfig(status, location, body)


def _limit(t: Section) -> LimitConfig:
    rate_text = t.string("rate", "")
    m = _RATE.fullmatch(rate_text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{t.where('rate')}: expected a rate like '50r/s' or '600r/m'")
    rate = float(m.group(1)) / (60.0 if m.group(2) == "m" else 1.0)
    key = t.string("key", "client")
    if key not in ("client", "forwarded") and not (
        key.startswith("header:") and _TOKEN.fullmatch(key[7:])
    ):
        raise ConfigError(
            f"{t.where('key')}: expected 'client', 'forwarded' or 'header:NAME', got {key!r}"
        )
    limit = LimitConfig(
        rate=rate,
        burst=t.integer("burst", 0),
        nodelay=t.boolean("nodelay", False),
        key=key if not key.startswith("header:") else "header:" + key[7:].lower(),
        status=t.integer("status", 429, minimum=400, maximum=599),
    )
    t.done()
    return limit
