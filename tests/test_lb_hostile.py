"""Inputs that once killed lb or parked a connection, each sent byte for byte to a
real lb (one process, and a supervisor with two workers) in front of the
recording backend: what the client gets, what reached the backend, and that lb
is still alive and serving afterwards. Every crash or hang the fuzz
(tests/test_lb_fuzz.py) ever finds joins the list below."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.edge import Answer, Vector, behind_proxy, probe
from bench.recorder import Seen, read_seen


@dataclass
class Hostile:
    port: int
    seen_file: Path
    log: Path

    async def send(self, data: bytes, requests: int = 1) -> Answer:
        before = len(self.seen())
        answer = await probe(self.port, Vector("t", "t", "", data, requests=requests))
        await asyncio.sleep(0.1)
        answer.reached = [
            {"method": s.method, "target": s.target, "version": s.version, "body": s.body}
            | {"te": s.header("transfer-encoding")}
            for s in self.seen()[before:]
        ]
        return answer

    def seen(self) -> list[Seen]:
        return [s for s in read_seen(self.seen_file) if s.target != "/health"]


@pytest.fixture(scope="module", params=["one process", "two workers"])
def lb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    work = tmp_path_factory.mktemp("lb-hostile")
    settings = '[health]\ninterval = "200ms"\n'
    if request.param == "two workers":
        settings = "workers = 2\n" + settings
    with behind_proxy("lb", work, settings) as (port, seen):
        yield Hostile(port, seen, work / "lb.log")
        # alive, serving, and not one traceback in its log for all of the above
        answer = asyncio.run(probe(port, Vector("after", "t", "", _get("/v/after"))))
        assert answer.statuses == [200]
        assert "Traceback" not in (work / "lb.log").read_text()


def _get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def _post(head: str, body: bytes) -> bytes:
    return b"POST /v/post HTTP/1.1\r\nHost: x\r\n" + head.encode() + b"\r\n" + body


async def test_a_higher_minor_version_pipelined_behind_another(lb: Hostile) -> None:
    # The version fallback once fed the same read again without end: a stack
    # overflow compiled (SIGSEGV), 30,718 log lines for one request with no server.
    data = (
        b"GET /q1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /q2 HTTP/1.2\r\nHost: x\r\nContent-Length: 19\r\n\r\nname=fuzz&n=1234567"
    )
    answer = await lb.send(data, requests=2)
    assert answer.statuses == [200, 200]
    assert [(r["target"], r["version"], r["body"]) for r in answer.reached] == [
        ("/q1", "HTTP/1.1", ""),
        ("/q2", "HTTP/1.1", "name=fuzz&n=1234567"),
    ]


async def test_versions_of_every_request_in_one_read(lb: Hostile) -> None:
    data = b"".join(
        f"GET /v/{i} HTTP/1.{minor}\r\nHost: x\r\n\r\n".encode()
        for i, minor in enumerate((1, 9, 0, 2, 1))
    )
    answer = await lb.send(data, requests=5)
    # HTTP/1.0 without keep-alive ends the connection after its answer
    assert answer.statuses == [200, 200, 200]
    assert [r["target"] for r in answer.reached] == ["/v/0", "/v/1", "/v/2"]
    answer = await lb.send(_get("/v/a") + b"GET /v/b HTTP/3.1\r\nHost: x\r\n\r\n", requests=2)
    assert answer.statuses == [200, 505] and answer.closed


@pytest.mark.parametrize("size", ["8000000000000005", "ffffffffffffffff", "10000000000000005"])
async def test_a_chunk_size_past_63_bits_is_refused_at_once(lb: Hostile, size: str) -> None:
    answer = await lb.send(
        _post("Transfer-Encoding: chunked\r\n", f"{size}\r\nhello\r\n0\r\n\r\n".encode())
    )
    assert answer.statuses == [400] and answer.closed
    assert answer.first_answer_s is not None and answer.first_answer_s < 1.0
    assert answer.reached == []


async def test_a_chunk_past_the_body_limit_is_refused_before_its_bytes(lb: Hostile) -> None:
    # lb's default max_body_bytes is 100 MiB: a chunk declared bigger is refused on its size line
    answer = await lb.send(_post("Transfer-Encoding: chunked\r\n", b"6400001\r\nhel"))
    assert answer.statuses == [413] and answer.closed
    assert answer.first_answer_s is not None and answer.first_answer_s < 1.0


@pytest.mark.parametrize(
    ("te", "status"),
    [
        ("gzip, chunked", 501),
        ("identity, chunked", 501),
        ("deflate , chunked", 501),
        (",chunked", 400),
        ("chunked, chunked", 400),
        ("chunked,", 400),
        ("chunked\t", 400),  # llhttp objects only once the head is whole: before it goes anywhere
    ],
)
async def test_transfer_codings_lb_would_drop_are_refused(
    lb: Hostile, te: str, status: int
) -> None:
    answer = await lb.send(_post(f"Transfer-Encoding: {te}\r\n", b"5\r\nhello\r\n0\r\n\r\n"))
    assert answer.statuses == [status] and answer.closed
    assert answer.reached == []


async def test_two_transfer_encoding_headers_are_refused(lb: Hostile) -> None:
    head = "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
    answer = await lb.send(_post(head, b"5\r\nhello\r\n0\r\n\r\n"))
    assert answer.statuses == [400] and answer.reached == []


async def test_trailers_never_reach_the_next_request(lb: Hostile) -> None:
    body = b"5\r\nhello\r\n0\r\nX-Smuggled: 1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    data = _post("Transfer-Encoding: chunked\r\n", body) + _get("/v/next")
    answer = await lb.send(data, requests=2)
    assert answer.statuses == [200, 200]
    seen = [s for s in read_seen(lb.seen_file) if s.target == "/v/next"]
    assert not seen[-1].header("x-smuggled")
    assert seen[-1].header("x-forwarded-for") == ["127.0.0.1"]


async def _in_writes(lb: Hostile, writes: list[bytes], gap: float, answers: int) -> list:
    """Send ``writes`` on one connection, each on its own and ``gap`` apart; wait
    for ``answers`` 200s; what the backend read of the last ``answers`` requests."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
    try:
        for part in writes:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(gap)
        got = b""
        while got.count(b"HTTP/1.1 200") < answers:
            got += await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    return [(s.target, s.body) for s in lb.seen()[-answers:]]


def _bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


async def test_a_chunked_body_in_tiny_writes_and_requests_after_it(lb: Hostile) -> None:
    data = _post("Transfer-Encoding: chunked\r\n", b"5;ext=1\r\nhello\r\n3\r\n, w\r\n0\r\n\r\n")
    data += _get("/v/after-chunked")
    # a byte a write: every boundary split somewhere
    assert await _in_writes(lb, _bytes(data), 0, 2) == [
        ("/v/post", "hello, w"),
        ("/v/after-chunked", ""),
    ]


async def test_requests_a_byte_a_segment(lb: Hostile) -> None:
    # Each byte in a TCP segment of its own, a few milliseconds apart, so that lb
    # reads them one by one: the blank line that ends a head straddles reads.
    data = _get("/v/slow-1") + _post("Content-Length: 5\r\n", b"hello") + _get("/v/slow-2")
    assert await _in_writes(lb, _bytes(data), 0.002, 3) == [
        ("/v/slow-1", ""),
        ("/v/post", "hello"),
        ("/v/slow-2", ""),
    ]


async def test_a_blank_line_across_three_reads_with_a_body_after_it(lb: Hostile) -> None:
    head = b"POST /v/split HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    writes = [head, b"\r", b"\nhello" + _get("/v/after-split")]
    assert await _in_writes(lb, writes, 0.05, 2) == [
        ("/v/split", "hello"),
        ("/v/after-split", ""),
    ]
