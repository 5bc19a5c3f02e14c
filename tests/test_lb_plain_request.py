"""lb/plain_request.py against llhttp: a request head the scan reads must be read
the same by the parser path that reads every other (llhttp's callbacks into
RequestInfo, as lb/reading.py and lb/client.py drive them); what it cannot vouch
for it must leave to that path.

Differential, on the request corpus of `python -m bench edge`, their pipelined
forms, plain requests, and at least 100,000 seeded mutations of all of them
(bytes flipped, inserted, deleted; header lines from the smuggling literature
put in): whenever the scan accepts, llhttp accepts the same message, with the
same method, target, version, keep-alive, Host, framing, the same bytes
forwarded upstream and the same end. A share of the mutations must be
accepted, so the test cannot pass by the scan refusing everything.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httptools
import pytest

from bench.edge import VECTORS
from lb.heads import BadRequest
from lb.plain_request import scan
from lb.request_head import RequestInfo, origin_form
from lb.settings import Limits
from tests.lbctl import lb_in_front_of
from tests.rawhttp import read_response

LIMITS = Limits()
MAX_BODY = 1 << 20
WATCH = frozenset({b"user-agent", b"x-tenant", b"host"})

PLAIN = [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    b"GET /users/42?fields=a,b&x=%20 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\n\r\n",
    b"POST /users HTTP/1.1\r\nHost: a.example\r\nContent-Type: application/json\r\n"
    b'Content-Length: 13\r\n\r\n{"name": "a"}',
    b"PUT /v HTTP/1.1\r\ncontent-length: 0\r\nhost: [::1]:8080\r\n\r\n",
    b"DELETE /v/1 HTTP/1.1\r\nHost: a.example\r\nX-Empty: \r\nCookie: a=1; b=2\r\n\r\n",
    b"HEAD /v HTTP/1.1\r\nHost: a.example\r\nX-Obs: caf\xc3\xa9\r\nX-Tenant: t1\r\n\r\n",
    b"PATCH /v HTTP/1.1\r\nHost: a.example\r\nContent-Length: 00002\r\n\r\nok",
    b"OPTIONS /v HTTP/1.1\r\nHost: a.example\r\nX-Tab: a\tb\r\n\r\n",
    b"GET /a/b/../c;p=1@x:y!$'()*+ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: Keep-Alive\r\nHost: a\r\nUser-Agent: b\r\n\r\n",
    b"POST /v HTTP/1.1\r\nContent-Length: 2\r\nHost: a\r\nConnection: close\r\n\r\nok",
    b"GET / HTTP/1.1\r\nConnection: CLOSE\r\nHost: a\r\n\r\n",
]
NOT_PLAIN = [
    b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:  a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-A\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1234567890123456789\r\n\r\nx",
    b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\xd0\x98 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",  # the head not whole in this read
]


class ReadByLlhttp:
    """What lb's parser path makes of a request: the callbacks of lb/reading.py
    (on_url, on_header with its limits) and lb/client.py (on_headers_complete)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.heads: list[tuple[bytes, bytes, bool, RequestInfo]] = []
        self.messages = 0
        self._url = b""
        self._size = 0
        self._headers = 0
        self._info = RequestInfo(watch=WATCH)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > LIMITS.max_header_bytes:
            raise BadRequest(414, "uri_too_long", "")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        self._headers += 1
        if self._size > LIMITS.max_header_bytes or self._headers > LIMITS.max_headers:
            raise BadRequest(431, "header_too_large", "")
        self._info.add(name, value)

    def on_headers_complete(self) -> None:
        info, self._info = self._info, RequestInfo(watch=WATCH)
        version = self.parser.get_http_version()
        http11 = version == "1.1"
        method, target = self.parser.get_method(), self._url
        self._url, self._size, self._headers = b"", 0, 0
        if not target.startswith(b"/") or method in (b"CONNECT", b"TRACE"):
            target = origin_form(method, target, info)
        info.finish(http11, MAX_BODY)
        self.heads.append((method, target, http11 and self.parser.should_keep_alive(), info))

    def on_message_complete(self) -> None:
        self.messages += 1

    def fed(self, data: bytes) -> tuple[int, int]:
        """Feed ``data``: (heads, messages) read so far, or (-1, -1) when refused."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, BadRequest):
            return -1, -1
        return len(self.heads), self.messages


def scan_all(data: bytes) -> list[tuple[int, bytes, bytes, RequestInfo]]:
    """The scan's reading of ``data`` request by request, as lb/reading.py goes:
    a head, then its body by Content-Length, then the next head; it stops at
    the first head it leaves to llhttp."""
    read = []
    pos = 0
    while pos < len(data):
        info = RequestInfo(watch=WATCH)
        end, method, target = scan(
            data, pos, info, LIMITS.max_header_bytes, LIMITS.max_headers, MAX_BODY
        )
        if end < 0:
            break
        read.append((end, method, target, info))
        pos = end + (info.content_length or 0)
        if info.close:
            break  # nothing is read after a request that ends the connection
    return read


def assert_read_alike(data: bytes) -> int:
    """Every head the scan accepts in ``data``, llhttp reads the same, and ends
    where the scan ends it (its head, and its message by its Content-Length);
    returns how many heads the scan accepted."""
    scanned = scan_all(data)
    read = ReadByLlhttp()
    pos = 0
    for number, (end, method, target, info) in enumerate(scanned, 1):
        # fed up to a byte before each end, then that byte: llhttp must end the
        # head, then the message, exactly where the scan does
        assert read.fed(data[pos : end - 1]) == (number - 1, number - 1), data
        assert read.fed(data[end - 1 : end]) == (number, number - bool(info.content_length)), data
        l_method, l_target, keep_alive, l_info = read.heads[-1]
        assert (method, target) == (l_method, l_target), data
        assert keep_alive is not info.close and info.close is l_info.close, data
        assert info.connection_tokens == l_info.connection_tokens, data
        assert info.has_connection_header is l_info.has_connection_header, data
        assert info.host == l_info.host, data
        assert info.content_length == l_info.content_length, data
        assert info.forwarded == l_info.forwarded, data
        assert info.captured == l_info.captured, data
        assert not l_info.chunked and l_info.upgrade is None and not l_info.expect_continue, data
        assert l_info.request_id is None and l_info.x_forwarded_for is None, data
        pos = end
        length = info.content_length or 0
        if length and end + length <= len(data):
            body_end = end + length
            assert read.fed(data[end : body_end - 1]) == (number, number - 1), data
            assert read.fed(data[body_end - 1 : body_end]) == (number, number), data
            pos = body_end
    return len(scanned)


@pytest.mark.parametrize("data", PLAIN)
def test_plain_requests_are_read_as_llhttp_reads_them(data: bytes) -> None:
    assert assert_read_alike(data) == 1
    # pipelined (after a request that asks to close, nothing more is read)
    assert assert_read_alike(data * 3) == (1 if b"onnection: close" in data.lower() else 3)


@pytest.mark.parametrize("data", NOT_PLAIN)
def test_anything_else_is_left_to_llhttp(data: bytes) -> None:
    assert scan_all(data) == []


def test_the_forwarded_lines_are_the_clients_less_content_length() -> None:
    info = RequestInfo()
    end, method, target = scan(PLAIN[2], 0, info, 16384, 100, MAX_BODY)
    assert (method, target) == (b"POST", b"/users") and PLAIN[2][end:] == b'{"name": "a"}'
    assert info.forwarded == (
        b" HTTP/1.1\r\nHost: a.example\r\nContent-Type: application/json\r\nX-Forwarded-For: "
    )
    assert info.content_length == 13 and info.host == b"a.example"


def test_limits_are_left_to_the_parser_path_to_refuse() -> None:
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n"
    assert scan(many, 0, RequestInfo(), 16384, 100, MAX_BODY)[0] == -1
    assert scan(many, 0, RequestInfo(), 16384, 101, MAX_BODY)[0] > 0
    post = PLAIN[2]
    assert scan(post, 0, RequestInfo(), 16384, 100, 12)[0] == -1
    assert scan(post, 0, RequestInfo(), 50, 100, MAX_BODY)[0] == -1


# -- mutations ------------------------------------------------------------------------

# Header lines from the request smuggling literature (Kettle's "HTTP Desync
# Attacks", PortSwigger's TE.CL/CL.TE/TE.TE, RFC 9112 11.2): what a scan that
# went by length alone, or by a loose reading of a name, would get wrong.
SMUGGLING_LINES = [
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 6",
    b"Content-Length:5",
    b"Content-Length : 5",
    b"Content-Length:  5",
    b"Content-Length: 5 ",
    b"Content-Length: 5, 5",
    b"Content-Length: +5",
    b"Content-Length: -1",
    b"Content-Length: 0x5",
    b"Content-Length: 05",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: 18446744073709551621",
    b"Content-Length: 5\x00",
    b"Content_Length: 5",
    b"Content-Length\t: 5",
    b" Content-Length: 5",
    b"Content-Length: 5\r\n 6",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding:  chunked",
    b"Transfer-Encoding: chunked ",
    b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding : chunked",
    b"Transfer-encoding: cHuNkEd",
    b"Transfer_Encoding: chunked",
    b"X: x\nTransfer-Encoding: chunked",
    b"Transfer-Encoding\x0b: chunked",
    b"TE: trailers",
    b"Host: b.example",
    b"Host: a.example:80",
    b"Host: a@b",
    b"Host: ",
    b"host: a.example",
    b"Connection: close",
    b"Connection: keep-alive, Host",
    b"Expect: 100-continue",
    b"Upgrade: websocket",
    b"X-Forwarded-For: 10.0.0.1",
    b"X-Request-ID: x",
    b"X-A: \xff\xfe",
    b"X-A: a\x7fb",
    b"X-A: a\x00",
    b"X-A: a\rb",
    b"X-A\x80: 1",
    b"X-Tenant: t2",
    b"User-Agent: curl/8",
    b"",
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to three changes: a byte flipped, inserted or removed
    (among the bytes that matter to a head), or a header line from the
    smuggling literature put in, or a line taken out."""
    alphabet = b"\r\n \t:\x00\x0b\x7f\x80\xffaA05-,;#%/?HTtp.Cc" + bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        head_end = out.find(b"\r\n\r\n")
        limit = len(out) if head_end < 0 else head_end + 4
        kind = rng.randrange(5)
        at = rng.randrange(limit + 1)
        if kind == 0 and at < len(out):
            out[at] = rng.choice(alphabet)
        elif kind == 1:
            out.insert(at, rng.choice(alphabet))
        elif kind == 2 and at < len(out):
            del out[at]
        else:
            lines = [i + 2 for i in range(limit) if out[i : i + 2] == b"\r\n"]
            if not lines:
                continue
            where = rng.choice(lines[:-1] or lines)
            if kind == 3:
                out[where:where] = rng.choice(SMUGGLING_LINES) + b"\r\n"
            else:
                nxt = out.find(b"\r\n", where)
                if 0 <= nxt < limit - 2:
                    del out[where : nxt + 2]
    return bytes(out)


def corpus() -> list[bytes]:
    edge = [v.data + v.body_after for v in VECTORS]
    pipelined = [a + b for a in edge[::3] for b in PLAIN[:2]] + [
        p + e for p in PLAIN for e in edge[::7]
    ]
    return PLAIN + NOT_PLAIN + edge + pipelined


def test_the_edge_corpus_is_read_alike_or_left_to_llhttp() -> None:
    accepted = sum(bool(assert_read_alike(data)) for data in corpus())
    assert accepted >= len(PLAIN)


def test_mutated_requests_are_read_alike_or_left_to_llhttp() -> None:
    rng = random.Random(20261207)
    seeds = corpus()
    accepted = 0
    total = 100_000
    for _ in range(total):
        accepted += bool(assert_read_alike(mutate(rng.choice(seeds), rng)))
    # enough mutations stayed plain (or became plain) for this to mean something
    assert accepted > total // 20, accepted


# -- through a real lb, to a backend that records every byte it gets -----------------

# The same requests written plainly (the scan reads them) and not (llhttp does:
# a second space after a colon, a trailing tab): the backend must get the same
# bytes either way, but for the request id lb gives each.
SAME = [
    (
        b"GET /a?b=1 HTTP/1.1\r\nHost: t.example\r\nUser-Agent: x\r\n\r\n",
        b"GET /a?b=1 HTTP/1.1\r\nHost:  t.example\r\nUser-Agent: x\r\n\r\n",
    ),
    (
        b"POST /p HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        b"POST /p HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5 \r\nX-A: 1\r\n\r\nhello",
    ),
    (
        b"GET /k HTTP/1.1\r\nConnection: keep-alive\r\nHost: t.example\r\n\r\n",
        b"GET /k HTTP/1.1\r\nConnection: keep-alive \r\nHost: t.example\r\n\r\n",
    ),
]


def _without_request_id(data: bytes) -> bytes:
    return b"\r\n".join(
        line for line in data.split(b"\r\n") if not line.lower().startswith(b"x-request-id:")
    )


async def test_plain_and_parsed_requests_reach_the_backend_alike(tmp_path: Path) -> None:
    """Pipelined, interleaved plain and not plain, a body split over reads: every
    request answered in order, and the backend gets the same bytes for each pair."""
    received: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if not head.startswith(b"GET /health"):
                    received.append(head + body)
                path = head.split(b" ", 2)[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with lb_in_front_of(backend, tmp_path) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        try:
            sent = [request for pair in SAME for request in pair]
            writer.write(b"".join(sent))  # all pipelined in one write
            for _ in sent:
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response.status == 200
            # a body that comes in three reads after a plain head
            post = SAME[1][0]
            for part in (post[:-5], post[-5:-2], post[-2:]):
                writer.write(part)
                await asyncio.sleep(0.05)
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200 and response.body == b"/p"
        finally:
            writer.close()
        assert len(received) == len(sent) + 1
        forwarded = [_without_request_id(r) for r in received]
        for k in range(len(SAME)):
            assert forwarded[2 * k] == forwarded[2 * k + 1]
        assert forwarded[2] == forwarded[-1]  # the body in three reads
        assert forwarded[2].endswith(b"\r\n\r\nhello") and b"Content-Length: 5\r\n" in forwarded[2]
        assert b"onnection: keep-alive" not in forwarded[4]  # lb writes its own


def test_the_request_scan_is_used_exactly_when_the_hot_path_is_compiled() -> None:
    from lb.reading import SCAN_REQUEST
    from proxycore.compiled import hot_path

    assert (hot_path() == "compiled") is SCAN_REQUEST
