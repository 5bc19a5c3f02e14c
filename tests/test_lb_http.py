"""lb as an HTTP/1.1 proxy: framing, headers, pipelining, bodies, upgrades, limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.lbctl import Lb, Upstream, lb_with
from tests.rawhttp import closed_by_peer, get, read_response, send

# round robin: the first test checks its order (the shipped method is peak_ewma)
SMALL_LIMITS = """
method = "round_robin"

[health]
interval = "200ms"
timeout = "200ms"

[limits]
max_header_bytes = "2k"
max_body_bytes = "64m"

[timeouts]
client_header = "1s"
client_keepalive = "2s"
client_body = "2s"
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lb, dict[str, Upstream]]]:
    with lb_with(tmp_path_factory.mktemp("lb-http"), settings=SMALL_LIMITS) as pair:
        yield pair


async def test_round_robin_across_both(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    async with aiohttp.ClientSession() as http:
        seen = Counter()
        for _ in range(20):
            async with http.get(lb.url + "/") as r:
                assert r.status == 200
                seen[r.headers["X-Upstream"]] += 1
    assert seen == {"a": 10, "b": 10}


async def test_forwarding_headers_and_request_id(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    raw = get(
        "/echo",
        host="site.example",
        extra="Connection: X-Hop\r\nX-Hop: 1\r\nX-Forwarded-For: 10.1.2.3\r\n",
    )
    (r,) = await send(lb.port, raw)
    seen = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "site.example"
    assert "x-hop" not in seen
    assert len(seen["x-request-id"]) == 32 and r.header("X-Request-ID") == seen["x-request-id"]
    (r,) = await send(lb.port, get("/echo", extra="X-Request-ID: trace-1\r\n"))
    seen = dict((k.lower(), v) for k, v in json.loads(r.body)["headers"])
    assert seen["x-request-id"] == "trace-1" and r.header("X-Request-ID") == "trace-1"


async def test_pipelined_requests_are_answered_in_order(
    proxy: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = proxy
    raw = get("/slow?s=0.3") + get("/echo/second") + get("/echo/third")
    responses = await send(lb.port, raw, count=3)
    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[0].body.startswith(b"slow from")
    assert json.loads(responses[1].body)["path"] == "/echo/second"
    assert json.loads(responses[2].body)["path"] == "/echo/third"


async def test_keep_alive_connection_serves_many(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        for i in range(5):
            writer.write(get(f"/echo/{i}"))
            r = await read_response(reader)
            assert json.loads(r.body)["path"] == f"/echo/{i}"
    finally:
        writer.close()


async def test_head_204_304(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        writer.write(b"HEAD /ten HTTP/1.1\r\nHost: t\r\n\r\n")
        r = await read_response(reader, head_request=True)
        assert r.status == 200 and r.header("Content-Length") == "10" and r.body == b""
        writer.write(get("/nocontent"))
        r = await read_response(reader)
        assert r.status == 204
        writer.write(get("/status/304"))
        r = await read_response(reader)
        assert r.status == 304
        writer.write(get("/ten"))  # the connection is still in step after all three
        r = await read_response(reader)
        assert r.body == b"0123456789"
    finally:
        writer.close()


async def test_expect_100_continue(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await read_response(reader)
        assert interim.status == 100
        writer.write(b"hello")
        r = await read_response(reader)
        assert r.status == 200 and json.loads(r.body)["bytes"] == 5
    finally:
        writer.close()


async def test_early_hints_pass_without_hop_by_hop_headers(
    proxy: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        for _ in range(2):  # the second response's head shares nothing with the first's
            writer.write(get("/early-hints"))
            hints = await read_response(reader)
            assert hints.status == 103
            assert hints.header("Link") == "</app.css>; rel=preload"
            assert hints.header("X-Hop") is None and hints.header("Connection") is None
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"hinted"
            assert r.header("Link") is None and r.header("X-Request-ID")
    finally:
        writer.close()


async def test_http10_client_gets_a_closed_body(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    writer.write(b"GET /download?bytes=100000 HTTP/1.0\r\n\r\n")
    r = await read_response(reader)
    writer.close()
    assert r.status == 200 and len(r.body) == 100000
    assert r.header("Transfer-Encoding") is None


async def test_websocket_is_tunnelled(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    async with aiohttp.ClientSession() as http, http.ws_connect(lb.url + "/ws") as ws:
        await ws.send_str("ping")
        reply = await ws.receive_str(timeout=5)
        assert reply.endswith(": ping")
        await ws.send_str("again")
        assert (await ws.receive_str(timeout=5)).endswith(": again")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_50mb_both_ways_streams_without_buffering(
    proxy: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = proxy
    assert lb.proc is not None
    before = rss_kb(lb.proc.pid)
    size = 50 * 1024 * 1024
    digest = hashlib.sha256()
    block = os.urandom(1024 * 1024)

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(50):
            digest.update(block)
            yield block

    peak = before
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.post(lb.url + "/upload", data=body()) as r:  # chunked: no length given
            answer = await r.json()
        assert answer["bytes"] == size and answer["sha256"] == digest.hexdigest()
        peak = max(peak, rss_kb(lb.proc.pid))
        received = 0
        async with http.get(lb.url + f"/download?bytes={size}") as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            async for chunk in r.content.iter_chunked(1 << 20):
                received += len(chunk)
                peak = max(peak, rss_kb(lb.proc.pid))
                await asyncio.sleep(0.002)  # a slow reader: lb must hold back, not buffer
        assert received == size
    assert peak - before < 30 * 1024, f"lb grew by {(peak - before) // 1024} MB"


POST = b"POST /echo HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost : t\r\n\r\n",
    ],
    ids=[
        "cl+te",
        "two-cl",
        "bad-chunk",
        "obs-fold",
        "te-not-chunked",
        "te-chunked-not-last",
        "no-host",
        "space-colon",
    ],
)
async def test_smuggling_vectors_never_reach_an_upstream(
    proxy: tuple[Lb, dict[str, Upstream]], raw: bytes
) -> None:
    lb, upstreams = proxy
    marker = os.urandom(4).hex()
    raw = raw.replace(b"/echo", f"/echo/{marker}".encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        writer.write(raw + get(f"/echo/{marker}-smuggled"))
        r = await read_response(reader)
        assert r.status == 400
        body = json.loads(r.body)
        assert body["code"] == "bad_request" and body["request_id"]
        assert await closed_by_peer(reader)
    finally:
        writer.close()
    async with aiohttp.ClientSession() as http:
        for upstream in upstreams.values():
            async with http.get(f"http://{upstream.address}/seen") as s:
                assert not any(marker in entry["path"] for entry in await s.json())


async def test_limits(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    (r,) = await send(lb.port, get("/echo", extra="X-Big: " + "x" * 3000 + "\r\n"))
    assert r.status == 431 and json.loads(r.body)["code"] == "header_too_large"
    (r,) = await send(
        lb.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n"
    )
    assert r.status == 413


async def test_slowloris_is_cut_and_costs_nothing_else(
    proxy: tuple[Lb, dict[str, Upstream]],
) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    started = asyncio.get_running_loop().time()
    try:
        writer.write(b"GET /echo HTTP/1.1\r\nHost: t\r\n")

        async def dribble() -> None:
            for _ in range(40):
                await asyncio.sleep(0.1)
                writer.write(b"X")

        dribbler = asyncio.create_task(dribble())
        async with aiohttp.ClientSession() as http:  # others are served meanwhile
            for _ in range(5):
                async with http.get(lb.url + "/") as r:
                    assert r.status == 200
        r = await read_response(reader)
        assert r.status == 408
        assert await closed_by_peer(reader)
        assert asyncio.get_running_loop().time() - started < 3.5  # client_header = 1s
        dribbler.cancel()
    finally:
        writer.close()


async def test_idle_keepalive_is_closed(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    writer.write(get("/"))
    await read_response(reader)
    assert await closed_by_peer(reader, timeout=5)  # client_keepalive = 2s
    writer.close()


async def test_garbage_gets_400_and_a_clean_close(proxy: tuple[Lb, dict[str, Upstream]]) -> None:
    lb, _ = proxy
    (r,) = await send(lb.port, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
    assert r.status == 400
    assert "Traceback" not in lb.log_text()


async def test_raw_utf8_in_the_target_is_passed_on_escaped(
    proxy: tuple[Lb, dict[str, Upstream]],
) -> None:
    """What `curl 'localhost:8080/user/search?first_name=Ив'` sends; nginx passes it."""
    lb, _ = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        for _ in range(2):  # and again on the same keep-alive connection, in two pieces
            writer.write("GET /echo/Ив?q=Пе HTTP/1.1\r".encode())
            await asyncio.sleep(0.05)
            writer.write(b"\nHost: t\r\n\r\n")
            r = await read_response(reader)
            assert r.status == 200
            assert json.loads(r.body)["path"] == "/echo/%D0%98%D0%B2?q=%D0%9F%D0%B5"
    finally:
        writer.close()


async def _client_connections(lb: Lb, expected: int) -> int:
    """lb's open client connections, once they are ``expected`` (or after 3 s)."""
    for _ in range(30):
        now = (await asyncio.to_thread(lb.status))["client_connections"]
        if now == expected:
            break
        await asyncio.sleep(0.1)
    return now


async def test_a_close_asked_for_closes_at_once_and_one_with_more_behind_lingers(
    tmp_path: Path,
) -> None:
    """nginx's lingering_close on: lb waits for the client's FIN only when the
    client may still be sending; a client that asked to close and sent nothing
    more is closed at once (its connection gone from lb while it still holds
    its own end open)."""
    with lb_with(tmp_path, names=("a",)) as (lb, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await read_response(reader)).status == 200
        assert await reader.read() == b""  # lb's FIN, no reset
        assert await _client_connections(lb, 0) == 0  # not waiting for ours
        writer.close()

        # A request pipelined behind the one that asked to close: lb answers the
        # first and lingers, reading what else comes, until the client closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert (await read_response(reader)).status == 200
        assert await reader.read() == b""
        writer.write(b"more bytes lb reads and drops")
        await asyncio.sleep(0.3)
        assert await _client_connections(lb, 1) == 1
        writer.close()
        assert await _client_connections(lb, 0) == 0
