"""HTTP routes of the users service and the middleware every answer goes through."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import consistency, db, validation
from .config import BackendConfig
from .errors import ApiError, error_response, from_http_exception
from .metrics import BackendMetrics, PoolCollector
from .passwords import hash_password, verify_password
from .tokens import issue_token

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", BackendConfig)
DATABASE = web.AppKey("database", db.Database)
METRICS = web.AppKey("metrics", BackendMetrics)
TOKENS = web.AppKey("tokens", consistency.Tokens)

USER_COLUMNS = "id, first_name, second_name, birthdate, biography, city"
INSERT_USER = """
INSERT INTO users (id, first_name, second_name, birthdate, biography, city, password_hash)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO NOTHING
"""
GET_USER = f"SELECT {USER_COLUMNS} FROM users WHERE id = $1"
GET_PASSWORD = "SELECT password_hash FROM users WHERE id = $1"
# Ranges rather than LIKE: with bound parameters the planner can still use the
# (first_name, second_name, id) index for a range, never for a LIKE pattern.
SEARCH_USERS = f"""
SELECT {USER_COLUMNS} FROM users
WHERE first_name >= $1 AND first_name < $2 AND second_name >= $3 AND second_name < $4
ORDER BY id
LIMIT $5
"""
MAX_REQUEST_ID = 200
HEAD_LINE_MAX = 64 * 1024


def _user_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "first_name": row["first_name"],
        "second_name": row["second_name"],
        "birthdate": row["birthdate"].isoformat(),
        "biography": row["biography"],
        "city": row["city"],
    }


def _json(data: object) -> web.Response:
    # Names are Cyrillic: send them as text, not as \u escapes.
    return web.json_response(data, dumps=_dumps)


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= MAX_REQUEST_ID and given.isprintable() and given.isascii():
        return given
    return uuid.uuid4().hex


@web.middleware
async def envelope(request: web.Request, handler: Any) -> web.StreamResponse:
    """Request id in, JSON errors out, metrics for every answer."""
    started = time.perf_counter()
    request_id = _request_id(request)
    request["request_id"] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        else:
            log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        response = error_response(exc.status, exc.code, exc.message, request_id)
    except web.HTTPException as exc:
        response = from_http_exception(exc, request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed (request id %s)", request.method, request.path, request_id)
        response = error_response(500, "internal", "internal error", request_id)
    response.headers["X-Request-ID"] = request_id
    # Which instance answered: the drill times a restarted backend's return by it.
    response.headers["X-Served-By"] = request.app[CONFIG].instance
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS]
    metrics.requests.labels(route, request.method, str(response.status)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response


async def register(request: web.Request) -> web.Response:
    data = validation.registration(validation.parse_json_object(await request.read()))
    loop = asyncio.get_running_loop()
    password_hash = await loop.run_in_executor(None, hash_password, data.password)
    user_id = uuid.uuid4()

    async def insert(conn: asyncpg.Connection) -> None:
        await conn.execute(
            INSERT_USER,
            user_id,
            data.first_name,
            data.second_name,
            data.birthdate,
            data.biography,
            data.city,
            password_hash,
        )

    _, position = await request.app[DATABASE].write(insert)
    response = _json({"user_id": str(user_id)})
    _hand_token(request, response, position)
    return response


def _hand_token(request: web.Request, response: web.Response, position: str) -> None:
    """The write's consistency token, in a header and in a cookie (a browser
    keeps it), for the reads that must see the write (consistency.py)."""
    tokens = request.app[TOKENS]
    token = tokens.issue(position)
    response.headers[consistency.HEADER] = token
    response.set_cookie(
        consistency.COOKIE,
        token,
        max_age=int(tokens.ttl_seconds),
        httponly=True,
        samesite="Lax",
        path="/",
    )


def _position(request: web.Request) -> str | None:
    """The WAL position the request's consistency token asks for, if any."""
    token = request.headers.get(consistency.HEADER) or request.cookies.get(consistency.COOKIE)
    return request.app[TOKENS].position(token)


async def login(request: web.Request) -> web.Response:
    data = validation.login(validation.parse_json_object(await request.read()))

    async def fetch(conn: asyncpg.Connection) -> str | None:
        return await conn.fetchval(GET_PASSWORD, data.user_id)

    stored = await request.app[DATABASE].read_primary(fetch)
    if stored is None:
        raise ApiError(404, "not_found", f"no user with id {data.user_id}")
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, verify_password, data.password, stored):
        raise ApiError(401, "bad_credentials", "wrong password")
    config = request.app[CONFIG]
    token = issue_token(config.token_secret, data.user_id, config.token_ttl_seconds)
    return _json({"token": token})


async def get_user(request: web.Request) -> web.Response:
    user_id = validation.user_id(request.match_info["id"])

    async def fetch(conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(GET_USER, user_id)

    database = request.app[DATABASE]
    row = await database.read(fetch, _position(request))
    if row is None:
        # The replica may not have applied a user made a moment ago (by a client
        # that does not send its token back): the master says "not found", not it.
        row = await database.read_primary(fetch, why="master_after_miss")
    if row is None:
        raise ApiError(404, "not_found", f"no user with id {user_id}")
    return _json(_user_json(row))


async def search(request: web.Request) -> web.Response:
    query = validation.search(request.query)
    first_upper = validation.prefix_upper_bound(query.first_name)
    last_upper = validation.prefix_upper_bound(query.last_name)

    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(
            SEARCH_USERS, query.first_name, first_upper, query.last_name, last_upper, query.limit
        )

    rows = await request.app[DATABASE].read(fetch, _position(request))
    return _json([_user_json(row) for row in rows])


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "instance": request.app[CONFIG].instance})


OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _open_database(app: web.Application) -> Any:
    config = app[CONFIG]

    async def pool(dsn: str) -> asyncpg.Pool:
        return await db.create_pool(
            dsn,
            password=config.db_password,
            max_size=config.pool_size,
            connect_timeout=config.connect_timeout,
            query_timeout=config.query_timeout,
        )

    rw = await pool(config.rw_dsn)
    ro = rw if config.ro_dsn == config.rw_dsn else await pool(config.ro_dsn)
    metrics = app[METRICS]
    metrics.registry.register(PoolCollector({"rw": rw, "ro": ro}))
    app[DATABASE] = db.Database(
        rw,
        ro,
        metrics=metrics,
        acquire_timeout=config.acquire_timeout,
        ro_falls_back_to_rw=config.ro_falls_back_to_rw,
        consistency_wait=config.consistency_wait,
    )
    yield
    await db.close_pool(rw)
    if ro is not rw:
        await db.close_pool(ro)


def make_app(config: BackendConfig) -> web.Application:
    app = web.Application(
        middlewares=[envelope],
        client_max_size=config.max_body_bytes,
        # aiohttp's own parser answers a line past its limits (8,190 bytes by
        # default) in plain text, before any route or middleware: with limits
        # above the proxies' (lb's and nginx's 16 KiB heads), every target a
        # proxy passes on reaches the routes and gets the service's JSON error.
        handler_args={"max_line_size": HEAD_LINE_MAX, "max_field_size": HEAD_LINE_MAX},
    )
    app[CONFIG] = config
    app[METRICS] = BackendMetrics(CollectorRegistry())
    app[TOKENS] = consistency.Tokens(config.token_secret, config.consistency_token_ttl)
    app.cleanup_ctx.append(_open_database)
    app.router.add_post("/user/register", register)
    app.router.add_post("/login", login)
    app.router.add_get("/user/get/{id}", get_user)
    app.router.add_get("/user/search", search)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
