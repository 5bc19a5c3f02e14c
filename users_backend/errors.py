"""The one error shape of the API: ``{message, request_id, code}`` with a 4xx/5xx status."""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    """An answer to the client that is not a success; raised by handlers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class BadRequest(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "bad_request", message)


class NotFound(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(404, "not_found", message)


class DatabaseUnavailable(ApiError):
    """The database could not serve the request, even after the retry."""

    retry_after_seconds = 1

    def __init__(self, message: str = "the database is unavailable, try again shortly") -> None:
        super().__init__(503, "db_unavailable", message)


# aiohttp's own refusals (unknown route, wrong method, body too large) keep their
# status and get our body; these are their codes.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    400: "bad_request",
}


def error_response(status: int, code: str, message: str, request_id: str) -> web.Response:
    body = json.dumps(
        {"message": message, "request_id": request_id, "code": code}, ensure_ascii=False
    )
    response = web.Response(status=status, text=body, content_type="application/json")
    if status == 503:
        response.headers["Retry-After"] = str(DatabaseUnavailable.retry_after_seconds)
    return response


def from_http_exception(exc: web.HTTPException, request_id: str) -> web.Response:
    code = _HTTP_CODES.get(exc.status, "http_error")
    response = error_response(exc.status, code, exc.reason, request_id)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response
