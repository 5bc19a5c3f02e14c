"""Every endpoint of the users service, over real sockets against real Postgres."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from stack.seed import SEED_PASSWORD
from tests.stackctl import StackHandle
from users_backend.tokens import check_token

NEW_USER = {
    "first_name": "Фёдор",
    "second_name": "Достоевский",
    "birthdate": "1971-11-11",
    "biography": "Писатель",
    "city": "Санкт-Петербург",
    "password": "idiot-1868",
}


@pytest.fixture
async def http(stack: StackHandle) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=stack.backend_url(0), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> dict:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"message", "request_id", "code"}
    assert body["code"] == code
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


async def register(http: aiohttp.ClientSession, **changes: str) -> str:
    async with http.post("/user/register", json={**NEW_USER, **changes}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["user_id"]


async def some_user_id(stack: StackHandle) -> str:
    from stack.postgres import connect

    conn = await connect(stack.ports.master, "users")
    try:
        return str(await conn.fetchval("SELECT id FROM users ORDER BY id LIMIT 1"))
    finally:
        await conn.close()


async def test_register_login_get(http: aiohttp.ClientSession, stack: StackHandle) -> None:
    user_id = await register(http)
    uuid.UUID(user_id)
    async with http.post("/login", json={"id": user_id, "password": NEW_USER["password"]}) as r:
        assert r.status == 200
        token = (await r.json())["token"]
    secret = stack.state()["topology"]["credentials"]["token_secret"].encode()
    assert check_token(secret, token) == uuid.UUID(user_id)
    # the login answered by the master; the read may come from the replica
    for _ in range(50):
        async with http.get(f"/user/get/{user_id}") as r:
            if r.status == 200:
                user = await r.json()
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the new user never became readable")
    expected = {k: v for k, v in NEW_USER.items() if k != "password"}
    assert user == {"id": user_id, **expected}


async def test_seeded_users_log_in_with_the_seed_password(
    http: aiohttp.ClientSession, stack: StackHandle
) -> None:
    user_id = await some_user_id(stack)
    async with http.post("/login", json={"id": user_id, "password": SEED_PASSWORD}) as r:
        assert r.status == 200


async def test_login_errors(http: aiohttp.ClientSession, stack: StackHandle) -> None:
    user_id = await some_user_id(stack)
    async with http.post("/login", json={"id": user_id, "password": "wrong"}) as r:
        await expect_error(r, 401, "bad_credentials")
    async with http.post("/login", json={"id": str(uuid.uuid4()), "password": "x"}) as r:
        await expect_error(r, 404, "not_found")
    async with http.post("/login", json={"id": "nope", "password": "x"}) as r:
        await expect_error(r, 400, "bad_request")
    async with http.post("/login", json={"id": user_id}) as r:
        await expect_error(r, 400, "bad_request")
    async with http.post("/login", data=b"{broken") as r:
        await expect_error(r, 400, "bad_request")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b"\xff\xfe\x00",
        json.dumps({**NEW_USER, "first_name": 42}).encode(),
        json.dumps({**NEW_USER, "birthdate": "2001-02-29"}).encode(),
        json.dumps({**NEW_USER, "birthdate": "11/11/1971"}).encode(),
        json.dumps({**NEW_USER, "second_name": "a\u0000b"}).encode(),
        json.dumps({**NEW_USER, "first_name": "\ud800"}).encode(),
        json.dumps({**NEW_USER, "surprise": 1}).encode(),
        json.dumps({k: v for k, v in NEW_USER.items() if k != "password"}).encode(),
    ],
)
async def test_register_bad_input_is_400(http: aiohttp.ClientSession, body: bytes) -> None:
    async with http.post("/user/register", data=body) as r:
        await expect_error(r, 400, "bad_request")


async def test_register_oversized_body_is_413(http: aiohttp.ClientSession) -> None:
    body = json.dumps({**NEW_USER, "biography": "x" * 200_000}).encode()
    async with http.post("/user/register", data=body) as r:
        await expect_error(r, 413, "payload_too_large")


async def test_get_user_errors(http: aiohttp.ClientSession) -> None:
    async with http.get("/user/get/not-a-uuid") as r:
        await expect_error(r, 400, "bad_request")
    async with http.get(f"/user/get/{uuid.uuid4()}") as r:
        await expect_error(r, 404, "not_found")


async def test_search_finds_prefixes_ordered_by_id(http: aiohttp.ClientSession) -> None:
    params = {"first_name": "Ив", "last_name": "Пе", "limit": "20"}
    async with http.get("/user/search", params=params) as r:
        assert r.status == 200
        users = await r.json()
    assert users, "the seeded data must hold people named Ив* Пе*"
    assert len(users) <= 20
    assert all(
        u["first_name"].startswith("Ив") and u["second_name"].startswith("Пе") for u in users
    )
    ids = [uuid.UUID(u["id"]) for u in users]
    assert ids == sorted(ids)


async def test_search_without_match_is_empty(http: aiohttp.ClientSession) -> None:
    async with http.get("/user/search", params={"first_name": "Zz", "last_name": "Qq"}) as r:
        assert r.status == 200
        assert await r.json() == []


@pytest.mark.parametrize(
    "query",
    [
        "last_name=Пе",
        "first_name=Ив",
        "first_name=Ив&last_name=Пе&limit=abc",
        "first_name=Ив&last_name=Пе&limit=0",
        "first_name=Ив&last_name=Пе&limit=100000",
        "first_name=&last_name=Пе",
        "first_name=%00&last_name=Пе",
    ],
)
async def test_search_bad_input_is_400(http: aiohttp.ClientSession, query: str) -> None:
    async with http.get(f"/user/search?{query}") as r:
        await expect_error(r, 400, "bad_request")


async def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_search_with_raw_utf8_in_the_url(stack: StackHandle) -> None:
    """What `curl 'localhost:8081/user/search?first_name=Ив&last_name=Пе'` sends."""
    target = "/user/search?first_name=Ив&last_name=Пе".encode()
    status, body = await raw_request(
        stack.ports.backend_1,
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    users = json.loads(body)
    assert users and all(u["first_name"].startswith("Ив") for u in users)


async def test_unknown_route_and_method(http: aiohttp.ClientSession) -> None:
    async with http.get("/no/such/thing") as r:
        await expect_error(r, 404, "not_found")
    async with http.delete("/user/register") as r:
        body = await expect_error(r, 405, "method_not_allowed")
        assert "POST" in r.headers["Allow"]
        assert body["message"]


async def test_request_id_is_kept_or_made(http: aiohttp.ClientSession) -> None:
    async with http.get("/health", headers={"X-Request-ID": "trace-me-42"}) as r:
        assert r.headers["X-Request-ID"] == "trace-me-42"
    async with http.get("/health") as r:
        assert len(r.headers["X-Request-ID"]) == 32
        # Every answer names the instance that gave it, errors included.
        assert r.headers["X-Served-By"] == (await r.json())["instance"]
    async with http.get("/user/get/not-a-uuid") as r:
        assert r.status == 400 and r.headers["X-Served-By"].startswith("users-backend")


async def test_health(http: aiohttp.ClientSession) -> None:
    async with http.get("/health") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok", "instance": "users-backend-1"}


async def test_metrics(http: aiohttp.ClientSession) -> None:
    async with http.get("/user/get/not-a-uuid"):
        pass
    async with http.get("/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert 'users_backend_requests_total{method="GET",route="/user/get/{id}",status="400"}' in text
    assert "users_backend_request_duration_seconds_bucket" in text
    assert 'users_backend_db_pool_connections{pool="ro",state="idle"}' in text
    assert "users_backend_db_pool_max_connections" in text
    assert "users_backend_db_retries_total" in text
