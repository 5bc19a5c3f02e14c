"""Login tokens: ``<user id>.<expiry unix time>.<HMAC-SHA256 signature>``.

Signed rather than stored so that either backend instance can check a token the
other issued, with no table that the replica would have to carry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid


def _sign(secret: bytes, payload: str) -> str:
    mac = hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def issue_token(
    secret: bytes, user_id: uuid.UUID, ttl_seconds: int, now: float | None = None
) -> str:
    expires = int((time.time() if now is None else now) + ttl_seconds)
    payload = f"{user_id}.{expires}"
    return f"{payload}.{_sign(secret, payload)}"


def check_token(secret: bytes, token: str, now: float | None = None) -> uuid.UUID | None:
    """The user id the token was issued for, or None when it is forged or expired."""
    try:
        user_text, expires_text, signature = token.split(".")
        user_id = uuid.UUID(user_text)
        expires = int(expires_text)
    except ValueError:
        return None
    if not hmac.compare_digest(signature, _sign(secret, f"{user_text}.{expires_text}")):
        return None
    if expires < (time.time() if now is None else now):
        return None
    return user_id
