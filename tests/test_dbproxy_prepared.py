"""Named prepared statements under transaction pooling, without sockets
(dbproxy/prepared.py), and the pooled listeners' configuration."""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import pytest

from dbproxy.config import from_args, parser
from dbproxy.credentials import as_secret, parse_userlist
from dbproxy.parameters import set_statement, startup_options
from dbproxy.pgwire import split_messages
from dbproxy.prepared import Outstanding, Statements, server_name
from proxycore.config import ConfigError


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def parse_body(name: bytes, query: bytes) -> bytes:
    return name + b"\0" + query + b"\0" + struct.pack("!h", 0)


def bind_body(statement: bytes) -> bytes:
    return b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0)


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    spans, rest = split_messages(data)
    assert rest == len(data)
    return [(data[s : s + 1], data[s + 5 : e]) for s, e in spans]


QUERY = b"SELECT $1::int"
TARGET = server_name(QUERY + b"\0" + struct.pack("!h", 0)).encode()


def test_a_named_statement_is_renamed_by_its_text_and_bound_by_that_name() -> None:
    client, conn = Statements(10), Outstanding()
    sent = client.rewrite(ord("P"), parse_body(b"s1", QUERY), conn)
    assert messages(sent) == [(b"P", parse_body(TARGET, QUERY))]
    sent = client.rewrite(ord("B"), bind_body(b"s1"), conn)
    assert messages(sent) == [(b"B", bind_body(TARGET))]
    conn.sent += 1  # the Sync
    # the ParseComplete is the client's, then the rest
    assert conn.answer(ord("1"), b"") is True
    assert conn.answer(ord("Z"), b"") is True
    assert conn.idle


def test_where_a_client_lands_its_statement_is_parsed_first_and_that_answer_dropped() -> None:
    client, first, second = Statements(10), Outstanding(), Outstanding()
    client.rewrite(ord("P"), parse_body(b"s1", QUERY), first)
    sent = client.rewrite(ord("B"), bind_body(b"s1"), second)
    assert messages(sent) == [(b"P", parse_body(TARGET, QUERY)), (b"B", bind_body(TARGET))]
    second.sent += 1
    assert second.answer(ord("1"), b"") is False  # dbproxy's Parse: not the client's
    assert second.answer(ord("2"), b"") is True  # BindComplete
    assert second.answer(ord("Z"), b"") is True
    # prepared there now: the next Bind goes alone
    assert messages(client.rewrite(ord("B"), bind_body(b"s1"), second)) == [
        (b"B", bind_body(TARGET))
    ]
    describe = client.rewrite(ord("D"), b"Ss1\0", second)
    assert messages(describe) == [(b"D", b"S" + TARGET + b"\0")]


def test_an_error_skips_what_the_batch_still_owed() -> None:
    client, conn = Statements(10), Outstanding()
    client.rewrite(ord("P"), parse_body(b"s1", QUERY), Outstanding())
    client.rewrite(ord("B"), bind_body(b"s1"), conn)  # a Parse injected, its answer to drop
    conn.sent += 1
    # the server refuses the Parse: no ParseComplete comes, and the statement is not there
    assert conn.answer(ord("E"), b"") is True
    assert TARGET.decode() not in conn.prepared
    assert conn.answer(ord("Z"), b"") is True
    assert conn.idle
    # the next batch's answers are not taken for the failed one's
    client.rewrite(ord("B"), bind_body(b"s1"), conn)
    conn.sent += 1
    assert conn.answer(ord("1"), b"") is False
    assert conn.answer(ord("Z"), b"") is True


def test_a_statement_parsed_again_is_closed_first_and_the_least_used_evicted() -> None:
    client, conn = Statements(2), Outstanding()
    client.rewrite(ord("P"), parse_body(b"a", QUERY), conn)
    again = messages(client.rewrite(ord("P"), parse_body(b"b", QUERY), conn))
    assert [kind for kind, _ in again] == [b"C", b"P"]
    assert [keep for _, keep, _, _ in conn.expect] == [True, False, True]
    client.rewrite(ord("P"), parse_body(b"c", b"SELECT 2"), conn)
    third = messages(client.rewrite(ord("P"), parse_body(b"d", b"SELECT 3"), conn))
    # two held at most: the least recently used goes, closed on the server
    assert [kind for kind, _ in third] == [b"C", b"P"]
    assert len(conn.prepared) == 2


def test_a_client_close_closes_the_renamed_statement() -> None:
    client, conn = Statements(10), Outstanding()
    client.rewrite(ord("P"), parse_body(b"s1", QUERY), conn)
    assert messages(client.rewrite(ord("C"), b"Ss1\0", conn)) == [(b"C", b"S" + TARGET + b"\0")]
    assert len(client) == 0
    # an unknown or unnamed statement goes as it came: the server answers it
    assert messages(client.rewrite(ord("B"), bind_body(b"nope"), conn)) == [
        (b"B", bind_body(b"nope"))
    ]
    assert messages(client.rewrite(ord("P"), parse_body(b"", QUERY), conn)) == [
        (b"P", parse_body(b"", QUERY))
    ]


def test_a_connection_gets_a_client_s_parameters_by_set() -> None:
    assert set_statement({"timezone": "UTC"}, {"timezone": "UTC"}) == ""
    assert (
        set_statement({"timezone": "Asia/Tokyo", "application_name": "it's"}, {"timezone": "UTC"})
        == """SET "application_name" TO 'it''s'; SET "timezone" TO 'Asia/Tokyo'"""
    )
    assert set_statement({}, {"datestyle": "ISO"}) == 'RESET "datestyle"'
    # a name is the client's: quoted, never SQL
    assert set_statement({'x"; DROP TABLE t; --': "1"}, {}) == (
        """SET "x""; DROP TABLE t; --" TO '1'"""
    )
    assert set_statement({"myapp.tenant": "7"}, {}) == """SET "myapp"."tenant" TO '7'"""


def test_options_read_as_the_server_reads_them() -> None:
    assert startup_options("-c search_path=a,b --statement-timeout=5s") == {
        "search_path": "a,b",
        "statement_timeout": "5s",
    }
    assert startup_options(r"-c application_name=two\ words -cwork_mem=8MB") == {
        "application_name": "two words",
        "work_mem": "8MB",
    }
    assert startup_options("-d 5") is None
    assert startup_options("") == {}


def test_the_userlist_reads_as_pgbouncer_s() -> None:
    users = parse_userlist('"app" "s3cret"\n;"x" "y"\n"quo""te" "md5abc" extra\n', "userlist")
    assert users == {"app": "s3cret", 'quo"te': "md5abc"}
    with pytest.raises(ConfigError, match="userlist:1"):
        parse_userlist('"lonely"\n', "userlist")
    assert as_secret("md5", "app", "s3cret").startswith("md5")
    assert as_secret("scram-sha-256", "app", "s3cret").startswith("SCRAM-SHA-256$4096:")
    assert as_secret("scram-sha-256", "app", "md5abcdef") == "md5abcdef"


def _args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["--server", "db=127.0.0.1:5432", *argv])


def test_pool_flags_and_the_auth_they_need(tmp_path: Path) -> None:
    config = from_args(_args("--pool-mode", "transaction", "--pool-size", "7"), env={})
    assert (config.pool.mode, config.pool.size, config.auth.type) == ("transaction", 7, "trust")
    with pytest.raises(ConfigError, match="needs \\[auth\\] file or \\[auth\\] user"):
        from_args(_args("--pool-mode", "session", "--auth-type", "scram-sha-256"), env={})
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"app" "pw"\n')
    config = from_args(
        _args("--pool-mode", "session", "--auth-type", "md5", "--auth-file", str(userlist)),
        env={},
    )
    assert config.auth.file == userlist
    toml = tmp_path / "dbproxy.toml"
    toml.write_text('[pool]\nmode = "session"\nsize = 2\nmin_size = 3\n')
    with pytest.raises(ConfigError, match=r"\[pool\]"):
        from_args(parser().parse_args(["--config", str(toml), "--server", "db=127.0.0.1:1"]))
