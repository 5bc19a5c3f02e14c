"""Policy and parsing, driven without sockets."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

import pytest

from stack.errors import StackError
from stack.postgres import find_bindir, sql_file
from stack.seed import generate_users
from stack.topology import Ports
from users_backend import validation
from users_backend.errors import BadRequest
from users_backend.passwords import hash_password, verify_password
from users_backend.tokens import check_token, issue_token

CYRILLIC = re.compile(r"^[А-ЯЁ][а-яё]+(-[А-ЯЁ][а-яё]+)?$")


@pytest.mark.parametrize(
    ("prefix", "upper"),
    [("Ив", "Иг"), ("a", "b"), ("az", "a{"), ("\ud7ff", "\ue000"), ("a\U0010ffff", "b")],
)
def test_prefix_upper_bound(prefix: str, upper: str) -> None:
    assert validation.prefix_upper_bound(prefix) == upper


def test_prefix_upper_bound_brackets_exactly_the_prefixed_strings() -> None:
    upper = validation.prefix_upper_bound("Ив")
    assert upper is not None
    for inside in ("Ив", "Иван", "Ивz", "Ив\U0010ffff"):
        assert "Ив" <= inside < upper
    for outside in ("Иа", "Иг", "Ия", "И"):
        assert not ("Ив" <= outside < upper)


def test_prefix_of_only_max_chars_has_no_bound() -> None:
    assert validation.prefix_upper_bound("\U0010ffff\U0010ffff") is None
    with pytest.raises(BadRequest):
        validation.search({"first_name": "\U0010ffff", "last_name": "a"})


GOOD = {
    "first_name": "Анна",
    "second_name": "Каренина",
    "birthdate": "1990-01-31",
    "password": "pw",
}


@pytest.mark.parametrize(
    "change",
    [
        {"first_name": 5},
        {"first_name": ""},
        {"first_name": "   "},
        {"first_name": "a\x00b"},
        {"first_name": "\ud800"},
        {"first_name": "x" * 101},
        {"birthdate": "1990-02-30"},
        {"birthdate": "19900131"},
        {"birthdate": "2020-W01-1"},
        {"birthdate": "tomorrow"},
        {"birthdate": 19900131},
        {"birthdate": "1899-12-31"},
        {"birthdate": "2999-01-01"},
        {"password": None},
        {"password": "x" * 2000},
        {"city": ["Москва"]},
        {"extra": "field"},
    ],
)
def test_registration_rejects(change: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        validation.registration({**GOOD, **change})


def test_birthdate_takes_today_and_refuses_tomorrow() -> None:
    # today is passed in: a date taken when the tests are collected is stale
    # by the time they run if midnight falls between
    today = dt.date(2026, 12, 8)
    assert validation.birthdate("2026-12-08", today=today) == today
    with pytest.raises(BadRequest, match="between"):
        validation.birthdate("2026-12-09", today=today)


def test_registration_rejects_missing_fields() -> None:
    for field in ("first_name", "second_name", "birthdate", "password"):
        body = dict(GOOD)
        del body[field]
        with pytest.raises(BadRequest, match=field):
            validation.registration(body)


def test_registration_accepts_and_trims() -> None:
    reg = validation.registration({**GOOD, "first_name": " Анна ", "city": "Тверь"})
    assert reg.first_name == "Анна"
    assert reg.birthdate == dt.date(1990, 1, 31)
    assert reg.biography == ""
    assert reg.city == "Тверь"


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"text"', b"\xff\xfe", b"", b"null"])
def test_parse_json_object_rejects(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        validation.parse_json_object(raw)


@pytest.mark.parametrize(
    "query",
    [
        {"last_name": "П"},
        {"first_name": "И"},
        {"first_name": "И", "last_name": "П", "limit": "x"},
        {"first_name": "И", "last_name": "П", "limit": "0"},
        {"first_name": "И", "last_name": "П", "limit": "501"},
        {"first_name": "", "last_name": "П"},
        {"first_name": "И\x00", "last_name": "П"},
    ],
)
def test_search_rejects(query: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        validation.search(query)


def test_passwords_round_trip() -> None:
    stored = hash_password("correct horse", iterations=1000)
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong horse", stored)
    assert not verify_password("correct horse", "garbage")
    assert not verify_password("correct horse", "md5$1$AA==$AA==")


def test_tokens() -> None:
    user = uuid.uuid4()
    token = issue_token(b"k", user, 60, now=1000)
    assert check_token(b"k", token, now=1030) == user
    assert check_token(b"k", token, now=1061) is None
    assert check_token(b"other", token, now=1030) is None
    assert check_token(b"k", token.replace(str(user), str(uuid.uuid4())), now=1030) is None
    assert check_token(b"k", "not.a.token", now=1030) is None


def test_seed_is_deterministic_and_russian() -> None:
    first = list(generate_users(200, seed=7))
    assert first == list(generate_users(200, seed=7))
    assert first != list(generate_users(200, seed=8))
    assert len({row[0] for row in first}) == 200
    for row in first:
        assert CYRILLIC.match(row[1]), row[1]
        assert CYRILLIC.match(row[2]), row[2]
    # one shared hash, that the service accepts for the seed password
    assert len({row[6] for row in first}) == 1
    assert verify_password("password", first[0][6])


def test_sql_file_quotes_values() -> None:
    statements = sql_file(
        "roles.sql", app_password="it's", check_password="c", replication_password="r"
    )
    assert "PASSWORD 'it''s'" in statements[0]
    assert all("--" not in s for s in statements)


def test_find_bindir_names_the_package_when_nothing_is_installed(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="apt-get install postgresql-15"):
        find_bindir(env={"PATH": str(tmp_path)}, debian_root=tmp_path / "none")


def test_port_overrides_are_checked() -> None:
    assert Ports().with_overrides({"backend-1": 9000}).backend_1 == 9000
    with pytest.raises(StackError, match="unknown port name"):
        Ports().with_overrides({"backend-9": 9000})
    with pytest.raises(StackError, match="out of range"):
        Ports().with_overrides({"entry": 70000})


def test_the_stacks_ports_are_below_the_ephemeral_range() -> None:
    # an outgoing connection's TIME_WAIT can hold a port in 32768-60999 after a
    # load test, and `stack up` would then refuse to start
    ports = Ports()
    assert all(getattr(ports, n.replace("-", "_")) < 32768 for n in Ports.names())
