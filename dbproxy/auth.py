"""dbproxy authenticating a client itself (pooled listeners): the exchange after
the startup packet, as PostgreSQL runs it, against the secret an auth_query or
an auth file gave for the user.

``ClientAuth`` is pure: it is fed the client's typed messages and says what to
send back; it ends ``done`` (with what dbproxy needs to log in to a server as
that client: the SCRAM ClientKey, or the md5 secret) or ``failed`` (with the
ErrorResponse, in Postgres's words: 28P01 "password authentication failed for
user ..."). A user with no secret gets the same answer as a wrong password, as
Postgres gives it (nothing tells a prober which users exist). No secret, proof
or password is ever in a message, an exception or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Final

from .pgwire import error_response
from .scram import MECHANISM, ScramError, Secret, ServerExchange

_INT32: Final = struct.Struct("!i")

TRUST: Final = "trust"
MD5: Final = "md5"
SCRAM: Final = "scram-sha-256"
AUTH_TYPES: Final = (TRUST, MD5, SCRAM)

# Authentication request codes (the 'R' message's first word)
_OK, _MD5, _SASL, _SASL_CONTINUE, _SASL_FINAL = 0, 5, 10, 11, 12


def _auth(code: int, data: bytes = b"") -> bytes:
    return b"R" + _INT32.pack(8 + len(data)) + _INT32.pack(code) + data


def authentication_ok() -> bytes:
    return _auth(_OK)


def md5_secret(user: str, password: str) -> str:
    """As pg_authid keeps an md5 password: "md5" + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_answer(secret: str, salt: bytes) -> bytes:
    """What a client (or dbproxy, with only the secret) answers an md5 challenge."""
    inner = secret[3:] if secret.startswith("md5") else secret
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


class ClientAuth:
    """One client's authentication. ``start()`` gives the first message to send;
    then ``feed(kind, body)`` for each typed message from the client gives what
    to send back, until ``done`` or ``failed``.

    ``method``: the listener's auth_type; ``secret``: the user's, as pg_authid
    keeps it ("SCRAM-SHA-256$..." or "md5..."), or None (no such user, or no
    password: refused as a wrong password would be, as Postgres does)."""

    def __init__(self, method: str, user: str, secret: str | None) -> None:
        if method not in AUTH_TYPES:
            raise ValueError(f"unknown auth_type {method!r}")
        self.method = method
        self.user = user
        self._secret = secret
        self._scram: ServerExchange | None = None
        self._scram_secret: Secret | None = None
        self._salt = b""
        self._stage = "start"
        self.done = False
        self.failed = False
        # What dbproxy needs to log in to a server as this client
        self.client_key: bytes | None = None  # SCRAM
        self.md5: str | None = None  # md5

    def start(self) -> bytes:
        if self.method == TRUST:
            self.done = True
            return authentication_ok()
        secret = self._secret or ""
        if self.method == SCRAM or secret.startswith("SCRAM-SHA-256$"):
            # Postgres: an md5 listener takes SCRAM for a SCRAM secret
            self._stage = "sasl-initial"
            return _auth(_SASL, MECHANISM.encode() + b"\0\0")
        self._stage = "md5"
        self._salt = os.urandom(4)
        return _auth(_MD5, self._salt)

    def feed(self, kind: bytes, body: bytes) -> bytes:
        if self.done or self.failed:
            raise RuntimeError("the exchange is over")
        if kind != b"p":
            return self._refuse("08P01", "expected a password response")
        try:
            if self._stage == "md5":
                return self._md5(body)
            if self._stage == "sasl-initial":
                return self._sasl_initial(body)
            if self._stage == "sasl-final":
                return self._sasl_final(body)
        except ScramError:
            return self._wrong()
        return self._refuse("08P01", "unexpected message in the authentication exchange")

    # -- md5 ---------------------------------------------------------------------------
    def _md5(self, body: bytes) -> bytes:
        answer = body.rstrip(b"\0")
        secret = self._secret
        if secret is None or not secret.startswith("md5"):
            return self._wrong()
        if not hmac.compare_digest(answer, md5_answer(secret, self._salt)):
            return self._wrong()
        self.md5 = secret
        self.done = True
        return authentication_ok()

    # -- SCRAM ---------------------------------------------------------------------------
    def _sasl_initial(self, body: bytes) -> bytes:
        mechanism, sep, rest = body.partition(b"\0")
        if not sep or mechanism.decode("latin-1") != MECHANISM or len(rest) < 4:
            return self._refuse("08P01", "client selected an invalid SASL authentication mechanism")
        (length,) = _INT32.unpack_from(rest)
        first = rest[4:]
        if length != len(first):
            return self._refuse("08P01", "malformed SASL message")
        secret = self._secret
        if secret is None or not secret.startswith("SCRAM-SHA-256$"):
            # no such user, or no SCRAM secret: Postgres runs the exchange against a
            # made-up secret so that the answer comes as late as a wrong password's
            self._scram_secret = Secret.of_password(os.urandom(16).hex())
            self._secret = None
        else:
            self._scram_secret = Secret.parse(secret)
        self._scram = ServerExchange(self._scram_secret)
        server_first = self._scram.first(first)
        self._stage = "sasl-final"
        return _auth(_SASL_CONTINUE, server_first)

    def _sasl_final(self, body: bytes) -> bytes:
        assert self._scram is not None
        server_final = self._scram.final(body)
        if self._secret is None:
            return self._wrong()
        self.client_key = self._scram.client_key
        self.done = True
        return _auth(_SASL_FINAL, server_final) + authentication_ok()

    # -- refusals ------------------------------------------------------------------------
    def _wrong(self) -> bytes:
        return self._refuse(
            "28P01",
            f'password authentication failed for user "{self.user}"',
        )

    def _refuse(self, code: str, message: str) -> bytes:
        self.failed = True
        return error_response(code, message)

    @property
    def scram_secret(self) -> Secret | None:
        """The secret the client's proof was checked against (for the login to a
        server with ``client_key``)."""
        return self._scram_secret if self.client_key is not None else None
