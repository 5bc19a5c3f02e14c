"""Turning untrusted JSON and query strings into typed values, or a BadRequest.

Everything that reaches asyncpg has passed through here, so nothing the client
sends can turn into a database error (and from there into a 500): no NUL bytes,
no lone surrogates, bounded lengths, real dates and uuids.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

NAME_MAX = 100
TEXT_MAX = 4000
PASSWORD_MAX = 1024
SEARCH_LIMIT_DEFAULT = 50
SEARCH_LIMIT_MAX = 500
OLDEST_BIRTHDATE = dt.date(1900, 1, 1)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class Registration:
    first_name: str
    second_name: str
    birthdate: dt.date
    biography: str
    city: str
    password: str


@dataclass(frozen=True, slots=True)
class Login:
    user_id: uuid.UUID
    password: str


@dataclass(frozen=True, slots=True)
class Search:
    first_name: str
    last_name: str
    limit: int


NUMBER_DIGITS_MAX = 100


def _bounded_int(text: str) -> int:
    # int() of a long digit string costs time quadratic in its length, and past
    # 4,300 digits Python refuses it with a ValueError: no field here is a
    # number, so a long one is refused before it is converted.
    if len(text) > NUMBER_DIGITS_MAX:
        raise BadRequest(f"a number in the body is longer than {NUMBER_DIGITS_MAX} digits")
    return int(text)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_int=_bounded_int)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise BadRequest("the body nests arrays or objects too deep") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def _text(value: object, field: str, *, max_len: int, required: bool = True) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string")
    if "\x00" in value:
        raise BadRequest(f"'{field}' must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{field}' is not valid Unicode text") from None
    if required and not value.strip():
        raise BadRequest(f"'{field}' must not be empty")
    if len(value) > max_len:
        raise BadRequest(f"'{field}' is longer than {max_len} characters")
    return value


def _fields(body: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    missing = sorted(required - set(body))
    if missing:
        raise BadRequest(f"missing field(s): {', '.join(missing)}")


def user_id(value: object, field: str = "id") -> uuid.UUID:
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string holding a uuid")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise BadRequest(f"'{field}' is not a valid uuid") from None


def birthdate(value: object, today: dt.date | None = None) -> dt.date:
    if not isinstance(value, str):
        raise BadRequest("'birthdate' must be a string in the form YYYY-MM-DD")
    # fromisoformat alone would also take "20200101" and week dates like "2020-W01-1"
    if not _DATE.fullmatch(value):
        raise BadRequest("'birthdate' must be a date in the form YYYY-MM-DD")
    try:
        parsed = dt.date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"'birthdate' is not a real date: {value}") from None
    today = today or dt.date.today()
    if not OLDEST_BIRTHDATE <= parsed <= today:
        raise BadRequest(f"'birthdate' must be between {OLDEST_BIRTHDATE} and today")
    return parsed


def registration(body: Mapping[str, Any]) -> Registration:
    _fields(
        body,
        required={"first_name", "second_name", "birthdate", "password"},
        optional={"biography", "city"},
    )
    return Registration(
        first_name=_text(body["first_name"], "first_name", max_len=NAME_MAX).strip(),
        second_name=_text(body["second_name"], "second_name", max_len=NAME_MAX).strip(),
        birthdate=birthdate(body["birthdate"]),
        biography=_text(body.get("biography", ""), "biography", max_len=TEXT_MAX, required=False),
        city=_text(body.get("city", ""), "city", max_len=NAME_MAX, required=False).strip(),
        password=_text(body["password"], "password", max_len=PASSWORD_MAX),
    )


def login(body: Mapping[str, Any]) -> Login:
    _fields(body, required={"id", "password"}, optional=set())
    return Login(
        user_id=user_id(body["id"]),
        password=_text(body["password"], "password", max_len=PASSWORD_MAX),
    )


def search(query: Mapping[str, str]) -> Search:
    for name in ("first_name", "last_name"):
        if name not in query:
            raise BadRequest(f"missing query parameter '{name}'")
    limit_text = query.get("limit", str(SEARCH_LIMIT_DEFAULT))
    try:
        limit = int(limit_text)
    except ValueError:
        raise BadRequest("'limit' must be a whole number") from None
    if not 1 <= limit <= SEARCH_LIMIT_MAX:
        raise BadRequest(f"'limit' must be between 1 and {SEARCH_LIMIT_MAX}")
    first = _text(query["first_name"], "first_name", max_len=NAME_MAX)
    last = _text(query["last_name"], "last_name", max_len=NAME_MAX)
    for name, prefix in (("first_name", first), ("last_name", last)):
        if prefix_upper_bound(prefix) is None:
            raise BadRequest(f"'{name}' cannot be searched as a prefix")
    return Search(first_name=first, last_name=last, limit=limit)


_MAX_CHAR = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``.

    The databases use the C collation, where text orders by code point, so
    ``prefix <= s < prefix_upper_bound(prefix)`` is exactly "s starts with
    prefix", and a b-tree range scan answers it. None when no such string exists
    (a prefix made only of U+10FFFF).
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code in _SURROGATES:
            code = _SURROGATES.stop
        if code <= _MAX_CHAR:
            return "".join(chars) + chr(code)
    return None
