"""Which route a request takes: plain functions and a Router, no I/O.

The host first, as nginx picks a server by server_name: an exact name, else the
longest "*.example.com", else the longest "www.example.*"; the routes of that
host and the routes of no host are the candidates (a route without a host
applies to every host). Among them the path decides as nginx decides between
locations: an exact path first; else the longest prefix, taken at once when it
is a path_prefix_first (nginx's ^~); else the first regex that matches, in file
order; else that longest prefix. The routes of the host come before the routes
of no host wherever the order decides. A route's methods and headers, when it
names any, must match too, or it is no candidate.

Paths are matched as they mean, not as they are spelled: percent-escapes
decoded, slashes merged, dot segments resolved, so no `/../`, `%2e%2e` or `//`
leads around a route (a path that climbs above the root is refused). What goes
to the server is the target as the client sent it, as nginx's proxy_pass
without a URI sends it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from mypy_extensions import i64

from .settings import RouteConfig

NO_ROUTE: Final = -1
BAD_PATH: Final = -2  # the path cannot be one: a bad escape, above the root
_ESCAPE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_SLASHES: Final = re.compile(rb"/{2,}")


def normalize_path(target: bytes) -> bytes | None:
    """The path of ``target`` as a route matches it; None when it cannot be one
    (a bad escape, a dot segment above the root)."""
    end = _plain_end(target)
    if end >= 0:
        return target if end == len(target) else target[:end]
    path = target
    for mark in (b"?", b"#"):
        at = path.find(mark)
        if at >= 0:
            path = path[:at]
    if path.find(b"%") >= 0:
        if path.count(b"%") != len(_ESCAPE.findall(path)):
            return None
        path = _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), path)
    if path.find(b"//") >= 0:
        path = _SLASHES.sub(b"/", path)
    if path.find(b"/.") < 0:
        return path
    out: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if not out:
                return None  # above the root
            out.pop()
        elif segment != b".":
            out.append(segment)
    trailing = path.endswith((b"/.", b"/..")) and out
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


def _plain_end(target: bytes) -> i64:
    """Where the path of ``target`` ends (its "?" or "#", or its end) when it is
    plain: no escape to decode, no "//" to merge, no dot segment; else -1.

    One pass over the bytes, compiled to a loop over them: the usual path costs
    less than a regex search (and ``b"?" in target`` would not do: CPython's
    bytes.__contains__ first tries its argument as an int, building a TypeError
    to drop)."""
    previous: i64 = 0
    for i in range(len(target)):
        c: i64 = target[i]
        if c == 63 or c == 35:  # "?" "#"
            return i
        if c == 37 or (previous == 47 and (c == 47 or c == 46)):  # "%", "//", "/."
            return -1
        previous = c
    return len(target)


_META: Final = frozenset(b".^$*+?{}[]\\|()")
_QUANTIFIERS: Final = frozenset(b"*+?{")


def required_prefix(pattern: bytes) -> bytes:
    """What every match of ``pattern`` starts with (b"" when it cannot tell):
    the plain characters right after a leading "^", up to one a quantifier
    follows; nothing when an alternation may be at the top (``^/a|b``) or an
    inline flag may change what matches (``(?i)``). b"/bench/" for
    ``^/bench/[0-9]+$``: a path that does not start so is not searched."""
    if not pattern.startswith(b"^") or b"|" in pattern or b"(?" in pattern:
        return b""
    prefix = bytearray()
    i, size = 1, len(pattern)
    while i < size:
        c = pattern[i]
        if c == 0x5C and i + 1 < size and not chr(pattern[i + 1]).isalnum():
            c = pattern[i + 1]  # an escaped punctuation is that character
            i += 2
        elif c in _META or c == 0x5C:
            break
        else:
            i += 1
        if i < size and pattern[i] in _QUANTIFIERS:
            break  # (this character may be absent or repeated)
        prefix.append(c)
    return bytes(prefix)


class _Candidate:
    __slots__ = ("headers", "index", "kind", "methods", "path", "regex")

    def __init__(self, index: int, route: RouteConfig) -> None:
        self.index = index
        self.kind = route.path_kind or "prefix"  # no path: the prefix "/", matched by any
        self.path = route.path.encode() if route.path_kind else b"/"
        self.regex = re.compile(self.path) if self.kind == "regex" else None
        self.methods = frozenset(m.encode() for m in route.methods)
        self.headers = tuple((k.encode(), v.encode()) for k, v in route.headers)

    def takes(self, method: bytes, headers: Mapping[bytes, bytes]) -> bool:
        if self.methods and method not in self.methods:
            return False
        return all(headers.get(k) == v for k, v in self.headers)


class _Plan:
    """The candidates of one host, ready for nginx's choice: exact paths in a
    dict, prefixes longest first (a tie keeps the candidates' order), regexes in
    order. ``narrowed``: some candidate names methods or headers, so a request
    first drops those it does not fit (then the generic ``_by_path``)."""

    __slots__ = (
        "candidates",
        "exact",
        "narrowed",
        "prefix_first",
        "prefix_index",
        "prefixes",
        "regexes",
    )

    def __init__(self, candidates: list[_Candidate]) -> None:
        self.candidates = candidates
        self.narrowed = any(c.methods or c.headers for c in candidates)
        self.exact: dict[bytes, int] = {}
        for c in candidates:
            if c.kind == "exact":
                self.exact.setdefault(c.path, c.index)
        by_length = sorted(
            (c for c in candidates if c.kind in ("prefix", "prefix_first")),
            key=lambda c: -len(c.path),
        )
        self.prefixes = [c.path for c in by_length]
        self.prefix_index = [c.index for c in by_length]
        self.prefix_first = [c.kind == "prefix_first" for c in by_length]
        self.regexes = [
            (c.regex, required_prefix(c.path), c.index) for c in candidates if c.regex is not None
        ]

    def choose(self, path: bytes, method: bytes, headers: Mapping[bytes, bytes]) -> int:
        if self.narrowed:
            return _by_path([c for c in self.candidates if c.takes(method, headers)], path)
        index = self.exact.get(path)
        if index is not None:
            return index
        prefixes = self.prefixes
        longest = -1
        for i in range(len(prefixes)):
            if path.startswith(prefixes[i]):
                longest = i
                break
        if longest >= 0 and self.prefix_first[longest]:
            return self.prefix_index[longest]
        for regex, prefix, at in self.regexes:
            if not path.startswith(prefix):
                continue  # a startswith is a tenth of a search
            if regex.search(path) is not None:
                return at
        return NO_ROUTE if longest < 0 else self.prefix_index[longest]


# Hosts remembered by the Router with their plan (as sent: case and port as
# they come); past this many distinct ones, a host is looked up each time.
_HOSTS_KEPT: Final = 1024


class Router:
    """The routes of a configuration, ready to match; ``match`` gives the index of
    the route a request takes, NO_ROUTE or BAD_PATH."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        exact: dict[bytes, list[_Candidate]] = {}
        leading: dict[bytes, list[_Candidate]] = {}  # "*.example.com"
        trailing: dict[bytes, list[_Candidate]] = {}  # "www.example.*"
        every: list[_Candidate] = []
        for i, route in enumerate(routes):
            candidate = _Candidate(i, route)
            if not route.hosts:
                every.append(candidate)
            for host in route.hosts:
                name = host.encode()
                if name.startswith(b"*."):
                    leading.setdefault(name[1:], []).append(candidate)
                elif name.endswith(b".*"):
                    trailing.setdefault(name[:-1], []).append(candidate)
                else:
                    exact.setdefault(name, []).append(candidate)
        # each host's candidates, then those of every host
        self._exact = {k: _Plan([*c, *every]) for k, c in exact.items()}
        self._leading = [
            (k, _Plan([*c, *every])) for k, c in sorted(leading.items(), key=lambda kv: -len(kv[0]))
        ]
        self._trailing = [
            (k, _Plan([*c, *every]))
            for k, c in sorted(trailing.items(), key=lambda kv: -len(kv[0]))
        ]
        self._every = _Plan(every)
        self._by_host: dict[bytes, _Plan] = {}
        self.by_host = bool(exact or leading or trailing)
        self.by_path = any(r.path_kind for r in routes)
        # The request headers some route looks at (lowercase): the client gathers these.
        self.header_names = frozenset(k.encode() for r in routes for k, _ in r.headers)
        only = routes[0] if len(routes) == 1 else None
        # One route that matches everything: no request needs to be looked at.
        self.single = only is not None and not (
            only.hosts or only.path_kind or only.methods or only.headers
        )

    def match(
        self,
        host: bytes,
        target: bytes,
        method: bytes,
        headers: Mapping[bytes, bytes],
    ) -> int:
        """The route for a request: ``host`` as the client sent it (the port and
        case do not matter), ``target`` its path and query as sent; NO_ROUTE
        when none takes it, BAD_PATH when its path cannot be matched."""
        if self.single:
            return 0
        plan = self._every
        if self.by_host:
            known = self._by_host.get(host)
            if known is None:
                known = self._plan_of(host)
                if len(self._by_host) < _HOSTS_KEPT and len(host) <= 261:  # a name and port
                    self._by_host[host] = known
            plan = known
        path = normalize_path(target) if self.by_path else b"/"
        if path is None:
            return BAD_PATH
        return plan.choose(path, method, headers)

    def _plan_of(self, host: bytes) -> _Plan:
        name = host.lower()
        # (an IPv6 literal keeps its colons)
        name = name[: name.find(b"]") + 1] if name.startswith(b"[") else name.partition(b":")[0]
        name = name.rstrip(b".")
        own = self._exact.get(name)
        if own is not None:
            return own
        for suffix, plan in self._leading:
            if name.endswith(suffix):
                return plan
        for prefix, plan in self._trailing:
            if name.startswith(prefix):
                return plan
        return self._every


def _by_path(candidates: list[_Candidate], path: bytes) -> int:
    """nginx's choice of a location among ``candidates`` (in their order)."""
    longest: _Candidate | None = None
    for c in candidates:
        if c.kind == "exact":
            if path == c.path:
                return c.index
        elif (
            c.kind != "regex"
            and path.startswith(c.path)
            and (longest is None or len(c.path) > len(longest.path))
        ):
            longest = c
    if longest is not None and longest.kind == "prefix_first":
        return longest.index
    for c in candidates:
        if c.regex is not None and c.regex.search(path):
            return c.index
    return NO_ROUTE if longest is None else longest.index
