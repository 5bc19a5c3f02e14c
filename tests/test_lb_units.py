"""lb's and proxycore's policies, driven without sockets."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from lb.config import from_section, load
from lb.framing import ChunkedBody, as_http11, head_end
from lb.heads import BadRequest, rule_name
from lb.request_head import (
    RequestInfo,
    origin_form,
    upstream_request_head,
    valid_host,
)
from lb.response_head import ResponseInfo, client_response_head
from lb.retry import RetryBudget, may_retry
from lb.settings import RetryBudgetSettings
from proxycore.balancing import LeastConn, SmoothWeightedRoundRobin, pick
from proxycore.config import Address, ConfigError, Section, parse_duration, parse_size
from proxycore.servers import CheckRecord, HealthParams, Server, ServerSet, ServerSpec
from proxycore.silence import Silence, StallWatch


def server(
    name: str, weight: int = 1, backup: bool = False, params: HealthParams | None = None
) -> Server:
    return Server(
        ServerSpec(name, Address("127.0.0.1", 1), weight, backup), params or HealthParams()
    )


@pytest.mark.parametrize(
    ("method", "reached", "answered", "replayable", "tries", "expected"),
    [
        (b"POST", False, False, False, 1, True),  # nothing reached an upstream: any method
        (b"POST", True, False, True, 1, False),  # may have reached a backend: never
        (b"GET", True, False, True, 1, True),
        (b"PUT", True, False, True, 1, True),
        (b"DELETE", True, False, True, 1, True),
        (b"PUT", True, False, False, 1, False),  # its body is gone
        (b"GET", True, True, True, 1, False),  # the client has bytes of the response
        (b"GET", False, False, True, 3, False),  # tries used up
        (b"PATCH", True, False, True, 1, False),
    ],
)
def test_retry_rule(
    method: bytes, reached: bool, answered: bool, replayable: bool, tries: int, expected: bool
) -> None:
    assert (
        may_retry(
            method=method,
            reached_upstream=reached,
            answered_client=answered,
            body_replayable=replayable,
            tries_done=tries,
            max_tries=3,
        )
        is expected
    )


def test_smooth_weighted_round_robin_interleaves() -> None:
    a, b, c = server("a", 5), server("b"), server("c")
    policy = SmoothWeightedRoundRobin()
    order = "".join(pick([a, b, c], policy).name for _ in range(7))
    assert order == "aabacaa"  # nginx's documented sequence for 5,1,1
    assert Counter(pick([a, b, c], policy).name for _ in range(700)) == {
        "a": 500,
        "b": 100,
        "c": 100,
    }


def test_least_conn_prefers_the_idle_and_respects_weight() -> None:
    a, b = server("a"), server("b", weight=2)
    a.active, b.active = 3, 1
    assert pick([a, b], LeastConn()).name == "b"
    a.active, b.active = 1, 2  # 1/1 == 2/2: a tie, shared in turn
    assert {pick([a, b], policy := LeastConn()).name, pick([a, b], policy).name} == {"a", "b"}


def test_backups_only_when_no_primary() -> None:
    a, spare = server("a"), server("spare", backup=True)
    policy = SmoothWeightedRoundRobin()
    assert pick([a, spare], policy) is a
    a.set_admin("drain")
    assert pick([a, spare], policy) is spare
    spare.set_admin("disabled")
    assert pick([a, spare], policy) is None
    a.set_admin("enabled")
    assert pick([a, spare], policy, exclude=[a]) is None  # backup only when no primary is up


def ok(flag: bool) -> CheckRecord:
    return CheckRecord(flag, "x", 0.001, time.time())


def test_rise_and_fall() -> None:
    s = server("a", params=HealthParams(rise=2, fall=3))
    for _ in range(2):
        s.record_check(ok(False))
    assert s.takes_traffic()
    s.record_check(ok(False))
    assert not s.takes_traffic() and s.state == "DOWN"
    s.record_check(ok(True))
    assert not s.takes_traffic()
    s.record_check(ok(True))
    assert s.takes_traffic() and s.state == "UP"


def test_passive_failures_eject_when_in_a_row_until_checks_bring_back() -> None:
    s = server("a", params=HealthParams(max_fails=2, fail_timeout=10, rise=2))
    s.record_failure("timed out", now=100)
    s.record_success()  # an answer between: the count starts again
    s.record_failure("timed out", now=101)
    assert s.takes_traffic(now=101)
    s.record_failure("timed out", now=102)
    assert not s.takes_traffic(now=102)
    assert not s.takes_traffic(now=10_000)  # with checks on, only checks bring it back
    s.record_check(ok(True))
    s.record_check(ok(True))
    assert s.takes_traffic()


def test_a_refused_connect_ejects_at_once() -> None:
    s = server("a", params=HealthParams(max_fails=5))
    s.connect_failed(ConnectionRefusedError(111, "Connection refused"))
    assert not s.takes_traffic() and s.connect_errors == 1


def test_a_timed_out_connect_counts_only_when_it_was_the_only_one() -> None:
    """Timed-out connects with others in flight may be the proxy's own burst;
    the last of them (none left connecting) counts, as any other error does."""
    s = server("a", params=HealthParams(max_fails=2))
    s.connecting = 3
    for _ in range(3):
        s.connecting -= 1
        s.connect_failed(TimeoutError())
    assert s.fails_in_a_row == 1 and s.connect_errors == 3
    s.connect_failed(ConnectionResetError(104, "reset"), "TLS to the server")
    assert not s.takes_traffic()


def test_the_panic_threshold_keeps_the_last_servers_in() -> None:
    params = HealthParams(max_fails=1, panic_threshold=50)
    servers = ServerSet.of(
        [ServerSpec(n, Address("127.0.0.1", i + 1)) for i, n in enumerate("abcd")], params
    )
    a, b, c, d = servers
    for s in (a, b):
        s.record_failure("timed out")
    assert not a.takes_traffic() and not b.takes_traffic()  # two of four out: 50% left
    c.record_failure("timed out")  # would leave 25%: stays in, as would d
    d.record_failure("timed out", at_once=True)
    assert c.takes_traffic() and d.takes_traffic()
    c.record_check(ok(False))
    c.record_check(ok(False))  # the checks may still take any server out
    assert not c.takes_traffic()


def test_passive_without_checks_is_nginx_fail_timeout() -> None:
    s = server("a", params=HealthParams(max_fails=1, fail_timeout=10, checks_enabled=False))
    s.record_failure("refused", now=100)
    assert not s.takes_traffic(now=105)
    assert s.takes_traffic(now=110.5)


def test_server_set_update_keeps_state() -> None:
    params = HealthParams()
    servers = ServerSet.of(
        [ServerSpec("a", Address("h", 1)), ServerSpec("b", Address("h", 2))], params
    )
    a = servers.get("a")
    assert a is not None
    a.total = 42
    added, removed = servers.update(
        [ServerSpec("a", Address("h", 1), weight=5), ServerSpec("c", Address("h", 3))], params
    )
    assert [s.name for s in added] == ["c"] and [s.name for s in removed] == ["b"]
    assert servers.get("a") is a and a.total == 42 and a.weight == 5


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("2s", 2), ("1m", 60), (3, 3), ("1.5s", 1.5)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[timeouts\] connect: expected a duration"):
        parse_duration("soon", "f.toml: [timeouts] connect")
    assert parse_size("16k", "x") == 16384
    path = tmp_path / "lb.toml"
    path.write_text(
        'listen = "127.0.0.1:1"\n[timeouts]\nconect = "1s"\n[[server]]\naddress = "127.0.0.1:2"\n'
    )
    with pytest.raises(ConfigError, match=rf"{path}:2: \[timeouts\] conect: unknown key"):
        load(path)
    path.write_text('[[server]]\naddress = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"\[server\[0\]\] address: expected 'HOST:PORT'"):
        load(path)
    path.write_text('method = "random"\n[[server]]\naddress = "127.0.0.1:2"\n')
    with pytest.raises(
        ConfigError, match="method: expected one of round_robin, least_conn, peak_ewma"
    ):
        load(path)


def test_defaults_are_nginx_like_but_passive_ejection_is_envoys() -> None:
    config = from_section(Section({"server": [{"address": "127.0.0.1:2"}]}, "", "x"), None)
    assert config.health.max_fails == 5 and config.health.fail_timeout == 10
    assert config.timeouts.client_keepalive == 75
    assert config.check.timing.interval == 1 and config.check.timing.timeout == 0.5
    assert (config.health.rise, config.health.fall) == (2, 2)


HEADERS = [(b"Host", b"example"), (b"Content-Length", b"5")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Host", b"x"), (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Host", b"x"), (b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked, gzip")],
        [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked, chunked")],
        [(b"Host", b"x"), (b"Content-Length", b"-1")],
        [(b"Content-Length", b"1")],  # HTTP/1.1 without Host
        [(b"Host", b"x"), (b"Host", b"y")],
    ],
)
def test_request_heads_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest) as info:
        RequestInfo(headers, http11=True, max_body=100)
    assert info.value.status == 400


def test_body_over_limit_is_413() -> None:
    with pytest.raises(BadRequest) as info:
        RequestInfo([(b"Host", b"x"), (b"Content-Length", b"101")], http11=True, max_body=100)
    assert info.value.status == 413


def test_forwarded_head_drops_hop_by_hop_and_adds_forwarding() -> None:
    headers = [
        (b"Host", b"site"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Accept", b"*/*"),
        (b"Proxy-Authorization", b"Basic x"),
    ]
    info = RequestInfo(headers, http11=True, max_body=100)
    head = upstream_request_head(b"GET", b"/p?q=1", info, b"rid", b"127.0.0.1").decode()
    assert head.startswith("GET /p?q=1 HTTP/1.1\r\n")
    for gone in ("X-Secret", "Keep-Alive", "TE:", "Connection", "Proxy-Authorization"):
        assert gone not in head
    assert "X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n" in head
    assert "X-Forwarded-Proto: http\r\nX-Forwarded-Host: site\r\nX-Request-ID: rid\r\n" in head
    response = b"".join(
        client_response_head(
            200,
            b"OK",
            ResponseInfo(
                [(b"Connection", b"close, X-Internal"), (b"X-Internal", b"1"), (b"Server", b"s")]
            ),
            content_length=b"3",
            chunked_to_client=False,
            keep_alive=True,
            request_id=b"rid",
        )
    ).decode()
    assert "X-Internal" not in response and "Connection" not in response
    assert "Server: s\r\nX-Request-ID: rid\r\nContent-Length: 3\r\n\r\n" in response
    # the upstream's digits are passed on as sent, an odd spelling is normalised
    assert ResponseInfo([(b"Content-Length", b" 42 ")]).content_length == b"42"
    assert ResponseInfo([(b"Content-Length", b"0042")]).content_length == b"0042"
    assert ResponseInfo([(b"Content-Length", b"0")]).content_length == b"0"
    with pytest.raises(ValueError):
        ResponseInfo([(b"Content-Length", b"+42")])
    # a name no rule looks at passes by its length alone, spelled as sent
    assert ResponseInfo([(b"X-Anything-Long-Enough-To-Skip", b"1")]).lines == (
        b"X-Anything-Long-Enough-To-Skip: 1\r\n"
    )


def test_rule_name_finds_every_watched_name_in_any_case_and_no_other() -> None:
    from lb.heads import _WATCHED_NAMES
    from lb.request_head import _REBUILT_REQUEST
    from lb.response_head import REBUILT_RESPONSE

    watched = _REBUILT_REQUEST | REBUILT_RESPONSE | {b"host"}
    assert {n.lower() for n in _WATCHED_NAMES} == watched
    for lower in watched:
        for spelled in (lower, lower.upper(), lower.title(), lower.swapcase().title()):
            assert rule_name(spelled) == lower
    # same length as a watched name, or one letter off: not watched
    for other in (b"Content-Type", b"Hos", b"Hosts", b"Gost", b"Content-Lengtx", b"", b"X" * 40):
        assert rule_name(other) == b""


def test_response_heads_read_on_one_connection_share_nothing() -> None:
    head = ResponseInfo()  # as an upstream connection keeps one for all its heads

    def read(pairs: list[tuple[bytes, bytes]], upgrade: bool = False) -> None:
        for name, value in pairs:
            head.add(name, value)
        head.finish(upgrade)

    read(
        [
            (b"X-Request-ID", b"up"),
            (b"Content-Length", b"5"),
            (b"Connection", b"close, X-Gone"),
            (b"X-Gone", b"1"),
            (b"Upgrade", b"h2c"),
            (b"Server", b"s"),
        ]
    )
    assert head.lines == b"X-Request-ID: up\r\nServer: s\r\n"
    assert head.request_id and head.content_length == b"5" and not head.chunked
    read([(b"Content-Type", b"t"), (b"Transfer-Encoding", b"chunked")])
    assert head.lines == b"Content-Type: t\r\n"
    assert not head.request_id and head.content_length is None and head.chunked
    # a 101 keeps its Upgrade header, where it was
    read([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"X-A", b"1")], upgrade=True)
    assert head.lines == b"Upgrade: websocket\r\nX-A: 1\r\n" and not head.chunked


def test_request_head_gathered_header_by_header() -> None:
    info = RequestInfo()
    assert not info.has_connection_header
    for name, value in [
        (b"Host", b"h"),
        (b"Connection", b"close, X-Gone"),
        (b"X-Gone", b"1"),
        (b"Close", b"x"),  # named in Connection too, once a second pass is due
    ]:
        info.add(name, value)
    info.finish(http11=True, max_body=0)
    assert info.has_connection_header and info.close
    assert info.forwarded == b" HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: "
    with pytest.raises(BadRequest):
        RequestInfo().finish(http11=True, max_body=0)  # no Host


def test_escape_request_line_only_touches_the_first_line() -> None:
    from lb.framing import escape_request_line

    raw = "GET /s?n=Ив HTTP/1.1\r\nX-Name: Иван\r\n\r\n".encode()
    escaped = escape_request_line(raw)
    assert escaped.startswith(b"GET /s?n=%D0%98%D0%B2 HTTP/1.1\r\n")
    assert escaped.endswith("X-Name: Иван\r\n\r\n".encode())


def test_request_ids_are_32_hex_digits_and_unique_across_the_counters_carry() -> None:
    import re

    from lb.request_head import _RequestIds

    ids = _RequestIds()
    made = [ids.next() for _ in range(1000)]  # at least three carries into the formatted digits
    assert all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)
    # consecutive, as a counter: the same process half, the counter half one apart
    counters = [int(i[16:], 16) for i in made]
    assert counters == list(range(counters[0], counters[0] + len(made)))
    assert len({i[:16] for i in made}) == 1


def test_connection_cannot_name_what_lb_frames_routes_or_sets() -> None:
    info = RequestInfo(
        [
            (b"Host", b"a.example"),
            (b"X-Custom", b"1"),
            (b"Connection", b"keep-alive, Host, X-Forwarded-For, Content-Length, X-Custom"),
        ]
    )
    assert info.forwarded == b" HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: "
    assert info.host == b"a.example"


@pytest.mark.parametrize(
    ("target", "path", "host"),
    [
        (b"http://b.example/p?q=1", b"/p?q=1", b"b.example"),
        (b"HTTPS://b.example:8443", b"/", b"b.example:8443"),
        (b"http://b.example?x", b"/?x", b"b.example"),
        (b"http://[::1]:80/x", b"/x", b"[::1]:80"),
    ],
)
def test_absolute_form_becomes_a_path_and_the_uris_host(
    target: bytes, path: bytes, host: bytes
) -> None:
    info = RequestInfo()
    info.add(b"Host", b"a.example")
    assert origin_form(b"GET", target, info) == path
    info.finish(http11=True, max_body=0)
    assert info.host == host
    assert info.forwarded == b" HTTP/1.1\r\nHost: " + host + b"\r\nX-Forwarded-For: "


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"http://u@b.example/", 400),
        (b"GET", b"http:///p", 400),
        (b"GET", b"gopher://b.example/", 400),
        (b"GET", b"p", 400),
        (b"GET", b"*", 400),
        (b"CONNECT", b"b.example:443", 405),
        (b"CONNECT", b"/p", 405),
    ],
)
def test_targets_refused(method: bytes, target: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as refused:
        origin_form(method, target, RequestInfo())
    assert refused.value.status == status
    assert origin_form(b"OPTIONS", b"*", RequestInfo()) == b"*"


@pytest.mark.parametrize("host", [b"a b", b"u@a.example", b"a/b", b"a\x00"])
def test_invalid_hosts_refused(host: bytes) -> None:
    with pytest.raises(BadRequest):
        RequestInfo([(b"Host", host)])


def test_higher_minor_versions_read_as_http11() -> None:
    assert as_http11(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n") == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert as_http11(b"GET / HTTP/1.9\n\n") == b"GET / HTTP/1.1\n\n"
    assert as_http11(b"GET / HTTP/1.10\r\n") is None
    assert as_http11(b"GET / FTP/1.2\r\n") is None
    with pytest.raises(BadRequest) as refused:
        as_http11(b"GET / HTTP/3.1\r\n")
    assert refused.value.status == 505


def test_retry_budget_is_a_share_of_the_requests_in_flight_with_a_floor() -> None:
    budget = RetryBudget(RetryBudgetSettings(percent=20, min_concurrency=2), now=0.0)
    assert budget.take(in_flight=5) and budget.take(in_flight=5)
    assert not budget.take(in_flight=5)  # 20% of 5 is 1: the floor of 2 holds
    assert budget.take(in_flight=20) and budget.take(in_flight=20)  # 20% of 20 is 4
    assert not budget.take(in_flight=20)
    assert budget.active == 4 and budget.exhausted == 2


def test_a_token_given_back_wakes_the_first_waiter_that_still_wants_one() -> None:
    budget = RetryBudget(RetryBudgetSettings(percent=0, min_concurrency=1), now=0.0)
    assert budget.take(in_flight=1)
    asked: list[str] = []

    def waiter(name: str, wants: bool) -> Callable[[], bool]:
        def wake() -> bool:
            asked.append(name)
            if not wants:
                return False  # its request ended meanwhile
            if budget.take(in_flight=1):
                return True
            budget.waiting.append(wake)  # no token after all: waits again
            return False

        return wake

    budget.waiting.extend([waiter("gone", False), waiter("a", True), waiter("b", True)])
    budget.give()
    budget.wake()
    assert asked == ["gone", "a"] and budget.active == 1 and len(budget.waiting) == 1
    budget.wake()  # no token: b is asked once, and waits again
    assert asked == ["gone", "a", "b"] and len(budget.waiting) == 1


# -- where a request ends (lb/framing.py) and what a host may be --------------------------


def test_head_end_finds_the_first_blank_line() -> None:
    rng = random.Random(5)
    for _ in range(20_000):
        data = bytes(rng.choice(b"\r\nab") for _ in range(rng.randint(0, 24)))
        start = rng.randint(0, 6)
        at = data.find(b"\r\n\r\n", start)
        assert head_end(data, start) == (at + 4 if at >= 0 else -1), (data, start)


def _scan_all(body: bytes, budget: int = 1000, splits: tuple[int, ...] = ()) -> tuple[int, bool]:
    chunks = ChunkedBody(budget, 100)
    at, consumed = 0, 0
    for end in (*splits, len(body)):
        part = body[at:end]
        stop = chunks.scan(part, 0)
        consumed += stop
        at = end
        if chunks.done:
            break
    return consumed, chunks.done


def test_chunked_body_ends_where_its_framing_ends_whatever_the_reads() -> None:
    body = b"5;ext=1\r\nhello\r\n3\r\n, w\r\n0\r\nX-T: 1\r\n\r\n"
    after = b"GET / HTTP/1.1\r\n"
    for split in range(1, len(body)):
        assert _scan_all(body + after, splits=(split,)) == (len(body), True)
    assert _scan_all(body[:-1]) == (len(body) - 1, False)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"8000000000000005\r\nhello", 400),  # past 63 bits: nginx's off_t
        (b"10000000000000005\r\nhello", 400),
        (b"3e9\r\n", 413),  # 1,001 bytes: past the budget before one arrives
        (b"5\nhello", 400),  # a bare LF
        (b"zz\r\n", 400),
        (b"5x\r\nhello", 400),
        (b"5\r\nhello!\r\n", 400),  # data longer than its size
        (b"0\r\n" + b"X: " + b"a" * 200 + b"\r\n\r\n", 400),  # a trailer line over its bound
    ],
)
def test_chunked_framing_refused(body: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        ChunkedBody(1000, 100).scan(body, 0)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"a.example", True),
        (b"a.example:8080", True),
        (b"a.example:", True),
        (b"10.0.0.1", True),
        (b"[::1]:8080", True),
        (b"[::1]", True),
        (b"a;b", True),  # sub-delims: a valid reg-name (RFC 3986)
        (b"", False),
        (b"a b", False),
        (b"a@b", False),
        (b"a.ex:mple", False),
        (b"a:1:2", False),
        (b"a:123456", False),
        (b":80", False),
        (b"[::1", False),
        (b"a]", False),
        (b"[::1]x", False),
    ],
)
def test_valid_host(value: bytes, ok: bool) -> None:
    assert valid_host(value) is ok


@pytest.mark.parametrize(
    ("values", "status"),
    [
        ([b"gzip, chunked"], 501),
        ([b"identity, chunked"], 501),
        ([b",chunked"], 400),
        ([b"chunked,"], 400),
        ([b"chunked, chunked"], 400),
        ([b"gzip"], 400),
        ([b"gzip", b"chunked"], 400),
    ],
)
def test_transfer_codings_other_than_chunked_alone(values: list[bytes], status: int) -> None:
    headers = [(b"Host", b"x"), *((b"Transfer-Encoding", v) for v in values)]
    with pytest.raises(BadRequest) as info:
        RequestInfo(headers, http11=True, max_body=100)
    assert info.value.status == status


def test_two_hosts_are_refused_in_http10_too() -> None:
    with pytest.raises(BadRequest):
        RequestInfo([(b"Host", b"a"), (b"Host", b"b")], http11=False, max_body=0)
    assert RequestInfo([], http11=False, max_body=0).host == b""


def test_silence_counts_from_when_something_was_owed() -> None:
    """An hour idle, then a request: not an hour of silence, but from the last
    sweep that found nothing owed; an answer starts it again."""
    s = server("a")
    silence = Silence(after=0.5)
    assert silence.suspects([s], now=0.0) == []
    assert silence.suspects([s], now=3600.0) == []  # idle: owes nothing
    s.bytes_out += 100
    assert silence.suspects([s], now=3600.1) == []
    assert silence.suspects([s], now=3600.5) == [s]  # owed since 3600.0, for 0.5 s
    s.bytes_in += 10
    assert silence.suspects([s], now=3600.6) == []  # heard
    s.bytes_out += 100
    assert silence.suspects([s], now=3601.0) == []
    assert silence.suspects([s], now=3601.1) == [s]


def test_a_question_unanswered_while_the_sessions_are_answered_marks_nothing_down() -> None:
    """The question waits behind every login a swamped server has to fork for;
    bytes from its sessions meanwhile say it lives. Silence everywhere: down."""
    s = server("a")

    async def main() -> None:
        async def busy(srv: Server, wait: float) -> bool:
            srv.bytes_in += 1  # its sessions are answered meanwhile
            return False

        async def frozen(srv: Server, wait: float) -> bool:
            return False

        loop = asyncio.get_running_loop()
        for answers, up in ((busy, True), (frozen, False)):
            watch = StallWatch(loop, lambda: [s], 0.05, answers, "requests", 1.0, "a GET")
            watch.ask(s, "requests waited")
            for _ in range(5):
                await asyncio.sleep(0)
            assert s.takes_traffic() is up

    asyncio.run(main())


def test_workers_tell_their_supervisor_a_suspect_was_heard_from() -> None:
    """With workers the supervisor asks, but the workers hear the sessions: one
    that told of a silent server tells again when it next hears from it, and
    the supervisor's unanswered question then marks nothing down."""
    s, own = server("a"), server("a")  # a worker's, and the supervisor's
    sent: list[dict[str, str]] = []

    class Channel:
        def send(self, message: dict[str, str]) -> None:
            sent.append(message)

    class Worker:
        channel = Channel()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def unanswered(srv: Server, wait: float) -> bool:
            await asyncio.sleep(wait)
            return False

        worker = StallWatch(loop, lambda: [s], 0.05, unanswered, "requests", 1.0, "a GET")
        worker.report_to(Worker())  # type: ignore[arg-type]
        supervisor = StallWatch(loop, lambda: [own], 0.05, unanswered, "requests", 1.0, "a GET")
        supervisor.supervise()
        worker.ask(s, "requests waited")
        assert [m["op"] for m in sent] == ["suspect"]
        assert supervisor.from_worker(sent[0], lambda key: own)
        worker.start()
        await asyncio.sleep(0.02)
        s.bytes_in += 1  # the worker's sessions are answered
        await asyncio.sleep(0.15)  # its next sweep tells
        assert [m["op"] for m in sent] == ["suspect", "heard"]
        assert supervisor.from_worker(sent[1], lambda key: own)
        await asyncio.sleep(0.3)  # the question's wait, and the news's grace
        worker.stop()
        assert own.takes_traffic() and supervisor.asked == 1 and supervisor.marked_down == 0
        # silent everywhere: the same question marks it down
        assert supervisor.from_worker(sent[0], lambda key: own)
        own.bytes_in += 1000  # a scrape summed the workers' counters: no news of now
        await asyncio.sleep(0.4)
        assert not own.takes_traffic() and supervisor.marked_down == 1

    asyncio.run(main())


def test_a_limit_shared_by_workers_is_divided_among_them() -> None:
    """dbproxy's max_sessions guards the server's max_connections, which every
    worker's sessions take from: each of N workers holds its part."""
    own = server("a")
    own.limit = 192
    state = own.shared()
    worker = server("a")
    worker.adopt(state, share=2)
    assert worker.limit == 96
    worker.adopt(state)  # lb's max_conns: each worker its own, as nginx's
    assert worker.limit == 192
    own.limit = 1
    worker.adopt(own.shared(), share=2)
    assert worker.limit == 1  # never none: a worker's sessions would only wait
    unlimited = server("b")
    worker_b = server("b")
    worker_b.adopt(unlimited.shared(), share=2)
    assert worker_b.limit == unlimited.limit
