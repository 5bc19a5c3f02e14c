"""lb.plain against llhttp: a response the scan reads must be read the same by
the parser (and ResponseInfo) that reads every other; what it cannot vouch for
it must leave to them.

Differential, on a corpus of plain and nearly plain responses and on seeded
random mutations of them: every input the scan accepts, llhttp accepts too,
as one whole message ending where the input ends, with the same status, reason,
keep-alive, Content-Length, X-Request-ID and the same header lines for the client.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httptools
import pytest

from lb.plain import scan
from lb.response_head import ResponseInfo
from tests.lbctl import lb_in_front_of
from tests.rawhttp import get, read_response

PLAIN = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 16\r\n\r\nhello from up1\n\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nServer: x\r\n\r\nno",
    b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\n.",
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length:3\r\n\r\nbad",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok",
    b"HTTP/1.1 201 Created\r\nX-Request-ID: abc\r\nContent-Length: 00002\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2  \r\nX-Tab:\tv \t\r\nX-Obs: caf\xc3\xa9\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 299 Whatever You Like !#$%\r\nContent-Length: 0\r\nHost: h\r\nExpect: x\r\n\r\n",
]
NOT_PLAIN = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\npart",  # the rest in a later read
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",  # more than one
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1 1\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: close, X-A\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 600 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
    b"HTTP/1.1 200 OK\r\n: empty\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\nok",
]


class ReadByLlhttp:
    """What lb's parser path makes of a response: the callbacks UpstreamConnection has."""

    def __init__(self) -> None:
        self.reason = b""
        self.head = ResponseInfo()
        self.status = 0
        self.keep_alive = False
        self.body = b""
        self.messages = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.add(name, value)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head.finish(upgrade=self.status == 101)
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages += 1


def llhttp_read(data: bytes) -> ReadByLlhttp | None:
    """The parser's reading of ``data`` as one whole message, or None."""
    read = ReadByLlhttp()
    try:
        read.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade, ValueError):
        return None
    return read if read.messages == 1 else None


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Header lines as (lowercase name, value without OWS): what they mean."""
    pairs = []
    for line in lines.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        pairs.append((name.lower(), value.strip(b" \t")))
    return pairs


def assert_read_alike(data: bytes) -> bool:
    """When the scan accepts ``data``, llhttp reads it the same; True when accepted."""
    head = ResponseInfo()
    start = scan(data, head)
    if start < 0:
        return False
    read = llhttp_read(data)
    assert read is not None, f"the scan accepted what llhttp refuses: {data!r}"
    assert read.status == head.status >= 200 and read.status not in (204, 304), data
    assert read.reason == head.reason, data
    assert read.keep_alive == head.keep_alive, data
    assert read.body == data[start:], data
    assert read.head.content_length == head.content_length, data
    assert not read.head.chunked and not head.chunked, data
    assert read.head.request_id == head.request_id, data
    assert header_pairs(read.head.lines) == header_pairs(head.lines), data
    return True


@pytest.mark.parametrize("data", PLAIN)
def test_plain_responses_are_read_as_llhttp_reads_them(data: bytes) -> None:
    assert assert_read_alike(data)


@pytest.mark.parametrize("data", NOT_PLAIN)
def test_anything_else_is_left_to_llhttp(data: bytes) -> None:
    assert scan(data, ResponseInfo()) == -1


def test_the_lines_the_client_gets_leave_out_only_what_lb_rebuilds() -> None:
    head = ResponseInfo()
    data = PLAIN[6]
    assert scan(data, head) > 0
    assert head.lines == b"X-A: 1\r\n" and head.content_length == b"2" and head.keep_alive
    head = ResponseInfo()
    assert scan(PLAIN[5], head) > 0 and not head.keep_alive and head.lines == b""


def mutations(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to three bytes of its head changed, inserted or removed,
    picked among the bytes that matter to a head (the body is kept: a change
    there only makes the length wrong)."""
    alphabet = b"\r\n \t:\x00\x7f\x80\xffaA0-9,;HTtp/.Cc" + bytes([rng.randrange(256)])
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 4
    out = bytearray(data[:end])
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(3)
        if kind == 0 and at < len(out):
            out[at] = rng.choice(alphabet)
        elif kind == 1:
            out.insert(at, rng.choice(alphabet))
        elif at < len(out):
            del out[at]
    return bytes(out) + data[end:]


def test_mutated_responses_are_read_alike_or_left_to_llhttp() -> None:
    rng = random.Random(20261202)
    accepted = 0
    for _ in range(50_000):
        data = mutations(rng.choice(PLAIN + NOT_PLAIN), rng)
        accepted += assert_read_alike(data)
    # enough mutations stayed plain (or became plain) for this to mean something
    assert accepted > 2_000


# -- through a real lb, to a backend that writes every byte itself ------------------

ANSWERS = {
    b"/id": b"HTTP/1.1 200 OK\r\nX-Request-ID: from-up\r\nContent-Length: 2\r\n\r\nid",
    b"/ka": b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nka",
    b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose",
    b"/split": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # "split" follows later
}


async def test_plain_and_parsed_responses_reach_the_client_alike(tmp_path: Path) -> None:
    """A connection that said close is never used again, the upstream's request
    id is the one the client gets, Connection is not passed on, and a body
    split over reads (llhttp's) arrives as whole as a plain one."""
    carried: list[list[bytes]] = []  # the paths each upstream connection carried

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        paths: list[bytes] = []
        carried.append(paths)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                paths.append(path)
                writer.write(ANSWERS.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
                if path == b"/split":
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"split")
                if path == b"/close":
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with lb_in_front_of(backend, tmp_path) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        try:
            bodies = []
            for path in ("/id", "/ka", "/close", "/close", "/split", "/close", "/"):
                writer.write(get(path))
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response.status == 200
                bodies.append(response.body)
                assert response.header("connection") is None, path  # keep-alive, ours
                if path == "/id":
                    assert response.header("x-request-id") == "from-up"
        finally:
            writer.close()
        assert bodies == [b"id", b"ka", b"close", b"close", b"split", b"close", b"ok"]
        ours = [paths for paths in carried if any(p != b"/health" for p in paths)]
        for paths in ours:
            # a connection's last request may be /close; none carried one after it
            assert b"/close" not in paths[:-1], carried
        assert sum(paths.count(b"/close") for paths in ours) == 3


def test_the_scan_is_used_exactly_when_the_hot_path_is_compiled() -> None:
    from lb.upstream import SCAN_PLAIN
    from proxycore.compiled import hot_path

    compiled = hot_path() == "compiled"
    assert compiled is SCAN_PLAIN
