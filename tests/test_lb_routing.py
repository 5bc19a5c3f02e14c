"""Routes, pools and rate limits without sockets: the configuration model, the
matching (nginx's precedence, case by case), the path normalisation that keeps a
route from being walked around, and the limit's leaky bucket."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.config import load
from lb.ratelimit import PASS, REFUSE, Limiter, remove_stale, shared_path
from lb.routes import expand_location, forwarded_client
from lb.routing import BAD_PATH, NO_ROUTE, Router, normalize_path, required_prefix
from lb.settings import LimitConfig, RouteConfig
from proxycore.config import ConfigError


def routes(*specs: dict[str, object]) -> list[RouteConfig]:
    out = []
    for i, spec in enumerate(specs):
        fields = dict(spec)
        kind = next((k for k in ("exact", "prefix", "prefix_first", "regex") if k in fields), "")
        path = str(fields.pop(kind)) if kind else ""
        out.append(
            RouteConfig(
                name=str(fields.pop("name", f"r{i}")),
                hosts=tuple(fields.pop("hosts", ())),  # type: ignore[arg-type]
                path_kind=kind,
                path=path,
                methods=frozenset(fields.pop("methods", ())),  # type: ignore[arg-type]
                headers=tuple(fields.pop("headers", ())),  # type: ignore[arg-type]
                pool="p",
            )
        )
        assert not fields, fields
    return out


def chosen(router: Router, configs: list[RouteConfig], target: str, host: str = "x") -> str:
    i = router.match(host.encode(), target.encode(), b"GET", {})
    return {NO_ROUTE: "none", BAD_PATH: "bad"}.get(i) or configs[i].name


# -- the path as a route sees it -------------------------------------------------
@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?x=/../admin", b"/a/b"),
        ("/api/../admin", b"/admin"),
        ("/api/%2e%2e/admin", b"/admin"),
        ("/api/%2E%2E/admin", b"/admin"),
        ("/api/.%2e/admin", b"/admin"),
        ("//admin", b"/admin"),
        ("/api//..//admin/", b"/admin/"),
        ("/./admin", b"/admin"),
        ("/admin/.", b"/admin/"),
        ("/a/%41", b"/a/A"),
        ("/%2F%2Fadmin", b"/admin"),  # an escaped slash is a slash, as nginx decodes it
        ("/a#frag", b"/a"),
    ],
)
def test_paths_are_matched_as_they_mean(target: str, path: bytes) -> None:
    assert normalize_path(target.encode()) == path


@pytest.mark.parametrize("target", ["/../etc/passwd", "/a/../../b", "/%2e%2e/x", "/a%2", "/a%zz"])
def test_a_path_that_cannot_be_one_is_refused(target: str) -> None:
    configs = routes({"prefix": "/"})
    assert chosen(Router(configs), configs, target) == "bad"


# -- nginx's precedence between locations -----------------------------------------
NGINX_DOC = routes(
    # the example of nginx's location documentation, in its order
    {"name": "A", "exact": "/"},
    {"name": "B", "prefix": "/"},
    {"name": "C", "prefix": "/documents/"},
    {"name": "D", "prefix_first": "/images/"},
    {"name": "E", "regex": r"\.(gif|jpg|jpeg)$"},
)


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("/", "A"),  # exact
        ("/index.html", "B"),  # the longest prefix
        ("/documents/document.html", "C"),  # a longer prefix
        ("/images/1.gif", "D"),  # ^~: a prefix that stops the regexes
        ("/documents/1.jpg", "E"),  # a regex beats a (non-^~) prefix
    ],
)
def test_nginx_documentation_example(target: str, name: str) -> None:
    assert chosen(Router(NGINX_DOC), NGINX_DOC, target) == name


def test_regexes_in_file_order_and_the_longest_prefix_otherwise() -> None:
    configs = routes(
        {"name": "short", "prefix": "/api/"},
        {"name": "long", "prefix": "/api/v2/"},
        {"name": "first", "regex": r"^/api/v2/.*\.json$"},
        {"name": "second", "regex": r"\.json$"},
        {"name": "exact", "exact": "/api/v2/a.json"},
    )
    router = Router(configs)
    assert chosen(router, configs, "/api/v2/a.json") == "exact"
    assert chosen(router, configs, "/api/v2/b.json") == "first"
    assert chosen(router, configs, "/other.json") == "second"
    assert chosen(router, configs, "/api/v2/b") == "long"
    assert chosen(router, configs, "/api/v1") == "short"
    assert chosen(router, configs, "/api") == "none"  # a prefix is a prefix of bytes
    # an exact route is exact: no trailing slash, no query in the way
    assert chosen(router, configs, "/api/v2/a.json?x=1") == "exact"
    assert chosen(router, configs, "/api/v2/a.json/") == "long"


@pytest.mark.parametrize(
    ("regexes", "target", "name"),
    [
        # the first in order that matches anywhere, not the one matching first
        ([r"c$", r"^/a"], "/a/c", "r0"),
        ([r"(x)(y)$", r"^/(a)", r"b"], "/a/b", "r1"),  # groups before the one that matched
        ([r"^/(x)\1", r"^/(a)\1"], "/aa", "r1"),  # a backreference: one by one
        ([r"(?i)^/A", r"^/a"], "/a", "r0"),  # flags that must come first: one by one
        ([r"^/(?P<n>x)", r"^/(?P<n>a)"], "/a", "r1"),  # a name twice: one by one
        ([r"z", r"y"], "/a", "none"),
    ],
)
def test_the_first_regex_in_order_that_matches_anywhere(
    regexes: list[str], target: str, name: str
) -> None:
    configs = routes(*({"regex": r} for r in regexes))
    assert chosen(Router(configs), configs, target) == name


def test_a_traversal_cannot_walk_around_a_route() -> None:
    configs = routes(
        {"name": "admin", "prefix": "/admin/"},
        {"name": "api", "prefix": "/api/"},
        {"name": "regex", "regex": r"^/admin"},
    )
    router = Router(configs)
    for target in ("/api/../admin/x", "/api/%2e%2e/admin/x", "//admin/x", "/api/..%2Fadmin/x"):
        assert chosen(router, configs, target) == "regex", target


# -- hosts ----------------------------------------------------------------------
HOSTS = routes(
    {"name": "exact", "hosts": ["api.example.com"]},
    {"name": "star", "hosts": ["*.example.com"]},
    {"name": "longer-star", "hosts": ["*.eu.example.com"]},
    {"name": "tail", "hosts": ["www.example.*"]},
    {"name": "every", "prefix": "/"},
)


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("api.example.com", "exact"),
        ("API.Example.COM:8080", "exact"),  # case and port do not matter
        ("api.example.com.", "exact"),  # nor a trailing dot
        ("www.example.com", "star"),  # exact beats the leading wildcard...
        ("x.eu.example.com", "longer-star"),  # ...and the longest leading wildcard wins
        ("www.example.org", "tail"),  # then the trailing wildcard
        ("example.com", "every"),  # "*.example.com" is not example.com itself
        ("other.net", "every"),  # no host route: the routes of every host
        ("[::1]:8080", "every"),
    ],
)
def test_host_exact_then_wildcards_then_default(host: str, name: str) -> None:
    assert chosen(Router(HOSTS), HOSTS, "/x", host) == name


def test_a_hosts_routes_come_before_every_hosts() -> None:
    configs = routes(
        {"name": "any-api", "prefix": "/api/"},
        {"name": "host-root", "hosts": ["a.test"], "prefix": "/"},
        {"name": "host-api", "hosts": ["a.test"], "prefix": "/api/"},
    )
    router = Router(configs)
    assert chosen(router, configs, "/api/x", "a.test") == "host-api"  # same length: the host's
    assert chosen(router, configs, "/api/x", "b.test") == "any-api"
    assert chosen(router, configs, "/x", "b.test") == "none"


def test_methods_and_headers_narrow_a_route() -> None:
    configs = routes(
        {"name": "canary", "prefix": "/", "headers": [(b"x-canary".decode(), "1")]},
        {"name": "writes", "prefix": "/", "methods": ["POST", "PUT"]},
        {"name": "rest", "prefix": "/"},
    )
    router = Router(configs)
    assert router.header_names == frozenset({b"x-canary"})
    assert configs[router.match(b"x", b"/", b"GET", {b"x-canary": b"1"})].name == "canary"
    assert configs[router.match(b"x", b"/", b"GET", {b"x-canary": b"2"})].name == "rest"
    assert configs[router.match(b"x", b"/", b"PUT", {})].name == "writes"
    assert configs[router.match(b"x", b"/", b"GET", {})].name == "rest"


def test_one_catch_all_looks_at_nothing() -> None:
    router = Router(routes({"name": "all"}))
    assert router.single and router.match(b"", b"/../x", b"GET", {}) == 0
    assert not Router(routes({"prefix": "/"})).single


# -- the file -----------------------------------------------------------------------
POOLS = """
listen = "127.0.0.1:1"
[health]
interval = "2s"

[[pool]]
name = "users"
method = "least_conn"
[[pool.server]]
name = "u1"
address = "127.0.0.1:2"
[[pool.server]]
address = "127.0.0.1:3"
weight = 2

[[pool]]
name = "static"
tries = 1
[pool.health]
interval = "5s"
[[pool.server]]
address = "127.0.0.1:4"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lb.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_pools_and_routes_from_the_file(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            POOLS
            + """
[[route]]
name = "users"
host = ["api.example.com", "*.api.example.com"]
path_prefix = "/users/"
methods = ["get", "POST"]
pool = "users"
tries = 2
hedge_after = "off"
max_body_bytes = "1m"
[route.timeouts]
first_byte = "2s"
[route.limit]
rate = "600r/m"
burst = 5
nodelay = true
key = "header:X-Api-Key"
status = 503

[[route]]
path_regex = "\\\\.(css|js)$"
pool = "static"

[[route]]
host = "old.example.com"
return = 301
location = "https://new.example.com$request_uri"

[[route]]
pool = "users"
""",
        )
    )
    users, static = config.pools
    assert (users.name, users.method, static.tries) == ("users", "least_conn", 1)
    assert [s.weight for s in users.servers] == [1, 2]
    assert users.check.timing.interval == 2 and static.check.timing.interval == 5
    route = config.routes[0]
    assert route.hosts == ("api.example.com", "*.api.example.com")
    assert (route.path_kind, route.path, route.methods) == ("prefix", "/users/", {"GET", "POST"})
    assert (route.tries, route.hedge_after, route.max_body_bytes) == (2, 0.0, 1024 * 1024)
    assert route.timeouts == (("first_byte", 2.0),)
    assert route.limit == LimitConfig(
        rate=10.0, burst=5, nodelay=True, key="header:x-api-key", status=503
    )
    assert config.routes[1].name == "route-2" and config.routes[1].path_kind == "regex"
    assert config.routes[2].answer is not None and config.routes[2].answer.status == 301
    assert config.routes[3].path_kind == "" and not config.routes[3].hosts  # the catch-all


def test_a_file_of_before_is_one_pool_and_a_catch_all(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[[server]]\naddress = "127.0.0.1:2"\n'))
    assert [p.name for p in config.pools] == ["http"]
    assert [(r.name, r.pool, r.path_kind) for r in config.routes] == [("default", "http", "")]


@pytest.mark.parametrize(
    ("route", "in_limit", "message"),
    [
        ('path_regex = "(unclosed"\npool = "users"', False, "path_regex: not a regular expression"),
        ('path_prefix = "users"\npool = "users"', False, "path_prefix: must start with '/'"),
        ('path = "/a"\npath_prefix = "/b"\npool = "users"', False, "a route has one of"),
        ('pool = "nope"', False, "pool: no pool 'nope'; pools: users, static"),
        ('pool = "users"\nreturn = 200', False, "a pool, or a `return`, not both"),
        ("return = 302", False, "location: a redirect"),
        ('host = "a*b"\npool = "users"', False, "host: expected a name"),
        ('pool = "users"\n[route.limit]\nrate = "fast"', True, "rate: expected a rate"),
        ('pool = "users"\n[route.limit]\nrate = "1r/s"\nkey = "cookie"', True, "key: expected"),
        ('pool = "users"\npth = "/"', False, "pth: unknown key"),
        ('pool = "users"\nmethods = "GET"', False, "methods: expected a list"),
    ],
)
def test_a_bad_route_names_its_line(
    tmp_path: Path, route: str, in_limit: bool, message: str
) -> None:
    # the bad route is the second one: the message names the line of its table
    # ([[route]], or [route.limit] for a key of the limit)
    text = POOLS + '\n[[route]]\npool = "users"\n\n[[route]]\n' + route + "\n"
    path = write(tmp_path, text)
    lines = text.splitlines()
    header = lines.index("[[route]]", lines.index("[[route]]") + 1) + 1
    if in_limit:
        header = lines.index("[route.limit]") + 1
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:{header}: "), str(info.value)
    assert message in str(info.value)


def test_several_pools_need_routes_and_names_are_distinct(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="several pools need"):
        load(write(tmp_path, POOLS))
    with pytest.raises(ConfigError, match="route"):
        load(write(tmp_path, POOLS + '[[route]]\nname = "a"\npool = "users"\n' * 2))


# -- the rate limit: nginx's limit_req ----------------------------------------
def limiter(rate: float, burst: int = 0, nodelay: bool = False) -> Limiter:
    return Limiter(LimitConfig(rate=rate, burst=burst, nodelay=nodelay))


def test_limit_without_burst_passes_one_per_interval() -> None:
    lim = limiter(10)  # one per 100 ms
    assert lim.admit(b"k", 1000) == PASS
    assert lim.admit(b"k", 1050) == REFUSE
    assert lim.admit(b"k", 1100) == PASS
    assert lim.admit(b"other", 1100) == PASS  # each key its own bucket
    lim.close()


def test_burst_is_delayed_to_the_rate_or_passed_with_nodelay() -> None:
    lim = limiter(10, burst=2)
    assert lim.admit(b"k", 0) == PASS
    assert lim.admit(b"k", 0) == pytest.approx(0.1)
    assert lim.admit(b"k", 0) == pytest.approx(0.2)
    assert lim.admit(b"k", 0) == REFUSE
    lim.close()
    lim = limiter(10, burst=2, nodelay=True)
    assert [lim.admit(b"k", 0) for _ in range(4)] == [PASS, PASS, PASS, REFUSE]
    assert lim.admit(b"k", 100) == PASS  # one has drained
    lim.close()


def test_workers_share_one_bucket(tmp_path: Path) -> None:
    config = LimitConfig(rate=10, burst=1, nodelay=True)
    one, two = Limiter(config, tmp_path / "t.limit"), Limiter(config, tmp_path / "t.limit")
    assert [one.admit(b"k", 0), two.admit(b"k", 0), one.admit(b"k", 0)] == [PASS, PASS, REFUSE]
    one.close()
    two.close()


def test_the_files_of_supervisors_that_are_gone_are_removed() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = shared_path(gone.pid, "t"), shared_path(os.getpid(), "t")
    try:
        for path in (stale, live):
            path.write_bytes(b"")
        assert remove_stale() >= 1
        assert not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_forwarded_client_only_past_trusted_proxies() -> None:
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    assert forwarded_client(b"10.0.0.1", b"1.2.3.4, 10.0.0.2", trusted) == b"1.2.3.4"
    assert forwarded_client(b"10.0.0.1", b"9.9.9.9, 1.2.3.4", trusted) == b"1.2.3.4"
    assert forwarded_client(b"5.5.5.5", b"1.2.3.4", trusted) == b"5.5.5.5"  # not trusted
    assert forwarded_client(b"10.0.0.1", None, trusted) == b"10.0.0.1"


def test_redirect_location() -> None:
    template = "https://$host$request_uri"
    assert expand_location(template, b"Old.Example.com:8080", b"/a?b=1") == (
        b"https://old.example.com/a?b=1"
    )
    assert expand_location("https://x/", b"h", b"/a") == b"https://x/"


# -- a regex's required prefix: a startswith before the search --------------------
@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (r"^/bench/[0-9]+$", b"/bench/"),
        (r"^/download/.*\.zip$", b"/download/"),
        (r"^/a\.b\-c", b"/a.b-c"),  # escaped punctuation is that character
        (r"^/ab?c", b"/a"),  # the character before a quantifier is not required
        (r"^/a{2}b", b"/"),
        (r"^/x\d+y", b"/x"),
        (r"^/[ab]c", b"/"),
        (r"\.(png|jpg|gif)$", b""),  # not anchored
        (r"^/a|/b", b""),  # an alternation may be at the top
        (r"(?i)^/ADMIN", b""),  # a flag: matches need not have the letters as written
        (r"^/(?:a)b", b""),  # any "(?": not read
    ],
)
def test_the_prefix_every_match_has(pattern: str, prefix: bytes) -> None:
    assert required_prefix(pattern.encode()) == prefix


PATTERNS = [
    rb"^/bench/[0-9]+$",
    rb"^/a.*\.zip$",
    rb"^/ab?c",
    rb"^/x{2,3}y?z",
    rb"^/[]a-]+b\.",
    rb"^(ab)*c\d",
    rb"^/a\\b",
]


@given(st.lists(st.sampled_from(list(b"/ab.xyzcjsonpgizd0123\\]-")), max_size=20).map(bytes))
def test_a_path_without_the_prefix_has_no_match(path: bytes) -> None:
    for pattern in PATTERNS:
        if re.search(pattern, path):
            assert path.startswith(required_prefix(pattern)), (pattern, path)
