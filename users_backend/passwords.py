"""Password hashing with the standard library's PBKDF2-HMAC-SHA256.

Stored form: ``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>``, so the cost can
be raised later without breaking old hashes. Hashing is CPU-bound and blocks; the
service calls it in an executor (hashlib releases the GIL while it runs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

SCHEME = "pbkdf2_sha256"
# About 40 ms on one core of the 2-core reference machine: costly for a guesser,
# cheap enough that "some writes" in the load drill do not starve the readers.
DEFAULT_ITERATIONS = 100_000
SALT_BYTES = 16


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations_text, salt_b64, digest_b64 = stored.split("$")
        iterations = int(iterations_text)
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
    except ValueError:
        return False
    if scheme != SCHEME or iterations <= 0:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)
