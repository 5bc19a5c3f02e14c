"""The PostgreSQL first packet, ErrorResponse and BackendKeyData, without sockets."""

from __future__ import annotations

import struct

import pytest

from dbproxy.pgwire import (
    BackendKeyWatcher,
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    Startup,
    cancel_request,
    error_response,
    packet_length,
    parse_first_packet,
)


def startup(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, 196608) + body


def test_startup() -> None:
    raw = startup(user="users_app", database="users", application_name="t")
    assert packet_length(raw) == len(raw)
    first = parse_first_packet(raw)
    assert isinstance(first, Startup)
    assert (first.user, first.database) == ("users_app", "users")
    assert first.raw == raw


def test_special_requests() -> None:
    assert isinstance(parse_first_packet(struct.pack("!ii", 8, 80877103)), SSLRequest)
    assert isinstance(parse_first_packet(struct.pack("!ii", 8, 80877104)), GSSENCRequest)
    cancel = parse_first_packet(cancel_request(4242, -7))
    assert isinstance(cancel, CancelRequest) and (cancel.pid, cancel.key) == (4242, -7)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("!ii", 12, 196608) + b"user",  # not terminated
        struct.pack("!ii", 9, 196608) + b"\0",  # no user
        struct.pack("!ii", 8, 2 << 16),  # protocol 2
        struct.pack("!ii", 13, 196608) + b"us\xffr\0",  # odd fields, not UTF-8
    ],
)
def test_startup_packets_the_server_judges(raw: bytes) -> None:
    # The server refuses these in its own words; dbproxy passes them on as they are.
    first = parse_first_packet(raw)
    assert isinstance(first, Startup) and first.raw == raw


def test_requests_the_server_reads_as_it_does() -> None:
    # an SSLRequest of any length is one; after SSL was settled, the code is a
    # protocol version the server refuses (a startup packet, for it to judge)
    assert isinstance(parse_first_packet(struct.pack("!iii", 12, 80877103, 0)), SSLRequest)
    assert isinstance(parse_first_packet(struct.pack("!ii", 8, 80877103), ssl_done=True), Startup)
    assert isinstance(parse_first_packet(struct.pack("!ii", 8, 80877104), gss_done=True), Startup)
    assert Startup(struct.pack("!ii", 8, 196608) + b"user\0\xff\0\0").user == "\xff"
    with pytest.raises(ProtocolViolation):  # dropped without a word, as the server does
        parse_first_packet(struct.pack("!ii", 12, 80877102) + b"\0\0\0\1")


@pytest.mark.parametrize("length", [0, 4, 7, 10_005, -5])
def test_bad_lengths(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        packet_length(struct.pack("!i", length))


def test_lengths_the_server_takes() -> None:
    assert packet_length(struct.pack("!i", 10_004)) == 10_004
    assert packet_length(struct.pack("!i", 8)) == 8


def test_error_response_shape() -> None:
    raw = error_response("57P03", "no server for listener 'rw'")
    assert raw[:1] == b"E"
    (length,) = struct.unpack("!i", raw[1:5])
    assert length == len(raw) - 1
    assert raw[5:] == b"SFATAL\0VFATAL\0C57P03\0Mno server for listener 'rw'\0\0"


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def test_backend_key_watcher_across_reads() -> None:
    stream = (
        message(b"R", struct.pack("!i", 0))
        + message(b"S", b"server_version\x0015\x00")
        + message(b"K", struct.pack("!ii", 1234, 5678))
        + message(b"Z", b"I")
        + message(b"T", b"after ready: not looked at")
    )
    watcher = BackendKeyWatcher()
    for i in range(0, len(stream), 3):  # in pieces smaller than a message head
        watcher.feed(stream[i : i + 3])
    assert watcher.key == (1234, 5678) and watcher.done


def test_backend_key_watcher_stops_on_error() -> None:
    watcher = BackendKeyWatcher()
    watcher.feed(message(b"E", b"SFATAL\0\0"))
    assert watcher.done and watcher.key is None
