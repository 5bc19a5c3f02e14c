"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both ways.

dbproxy authenticates a client itself when it pools server connections: it
plays the server against a secret as Postgres stores it (pg_authid.rolpassword,
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``), and a client
whose proof checks out has given away its ClientKey (proof XOR signature).
With that key dbproxy can then log in to a server as the client, as pgbouncer
does, without ever having had the password: ``ClientExchange.from_keys``.

Pure: bytes in, bytes out; the wire framing (AuthenticationSASL and friends)
is dbproxy/pgwire.py's. Nothing here logs a secret or a proof.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # Postgres's scram_iterations default
NONCE_BYTES = 18  # Postgres's SCRAM_RAW_NONCE_LEN


class ScramError(Exception):
    """The exchange cannot go on: a malformed message, or a proof that fails."""


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ScramError(f"malformed {what}") from None


@dataclass(frozen=True, slots=True)
class Secret:
    """What a server keeps of a password: never the password itself."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def parse(cls, text: str) -> Secret:
        """``SCRAM-SHA-256$4096:c2FsdA==$StoredKey:ServerKey`` (pg_authid's form)."""
        try:
            mechanism, params, keys = text.split("$")
            iterations, salt = params.split(":")
            stored, server = keys.split(":")
            secret = cls(
                int(iterations),
                _unb64(salt, "salt"),
                _unb64(stored, "StoredKey"),
                _unb64(server, "ServerKey"),
            )
        except ValueError:
            raise ScramError("not a SCRAM-SHA-256 secret") from None
        if mechanism != MECHANISM or secret.iterations < 1 or len(secret.stored_key) != 32:
            raise ScramError("not a SCRAM-SHA-256 secret")
        return secret

    @classmethod
    def of_password(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> Secret:
        """As Postgres makes one (no SASLprep here: an ASCII password is its own)."""
        salt = os.urandom(16) if salt is None else salt
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(iterations, salt, _h(client_key), _hmac(salted, b"Server Key"))

    def __str__(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}$"
            f"{_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def __repr__(self) -> str:  # never the keys, in a log or a traceback
        return f"Secret(iterations={self.iterations}, ...)"


def _attributes(message: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        name, sep, value = part.partition("=")
        if not sep or len(name) != 1:
            raise ScramError(f"malformed {what}")
        out.setdefault(name, value)
    return out


class ServerExchange:
    """dbproxy as the server: ``first`` takes the client-first-message and gives
    the server-first; ``final`` takes the client-final and gives the
    server-final (or raises: a wrong password). ``client_key`` after success."""

    def __init__(self, secret: Secret, nonce: str | None = None) -> None:
        self._secret = secret
        self._server_nonce = _b64(os.urandom(NONCE_BYTES)) if nonce is None else nonce
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.client_key: bytes | None = None

    def first(self, client_first: bytes) -> bytes:
        text = client_first.decode("utf-8", "replace")
        gs2, sep, bare = text.partition(",")
        authzid, sep2, bare = bare.partition(",")
        # "n": no channel binding; "y": the client could but thinks we cannot.
        if not sep or not sep2 or gs2 not in ("n", "y") or authzid:
            raise ScramError("malformed SCRAM client-first-message (channel binding unsupported)")
        attrs = _attributes(bare, "SCRAM client-first-message")
        client_nonce = attrs.get("r", "")
        if not client_nonce or "n" not in attrs:
            raise ScramError("malformed SCRAM client-first-message")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        secret = self._secret
        self._server_first = f"r={self._nonce},s={_b64(secret.salt)},i={secret.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        text = client_final.decode("utf-8", "replace")
        without_proof, sep, proof_part = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM client-final-message")
        attrs = _attributes(without_proof, "SCRAM client-final-message")
        if attrs.get("r") != self._nonce or attrs.get("c") not in ("biws", "eSws"):
            raise ScramError("malformed SCRAM client-final-message")
        proof = _unb64(proof_part, "SCRAM proof")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        secret = self._secret
        signature = _hmac(secret.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("password authentication failed")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(_h(client_key), secret.stored_key):
            raise ScramError("password authentication failed")
        self.client_key = client_key
        return f"v={_b64(_hmac(secret.server_key, auth_message))}".encode()


class ClientExchange:
    """dbproxy as the client, logging in to a server: ``first`` gives the
    client-first-message, ``final`` takes the server-first and gives the
    client-final, ``verify`` takes the server-final (raises if the server
    does not know the password either)."""

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        user: str = "",
    ) -> None:
        if password is None and (client_key is None or server_key is None):
            raise ValueError("a password, or a client key and a server key")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _b64(os.urandom(NONCE_BYTES)) if nonce is None else nonce
        # Postgres clients send no user name here (it is in the startup packet)
        self._client_first_bare = f"n={user},r={self._nonce}"
        self._expected = b""

    @classmethod
    def from_keys(cls, client_key: bytes, secret: Secret) -> ClientExchange:
        """With what a client gave away by logging in to dbproxy (its ClientKey) and
        the secret dbproxy checked it against: no password needed."""
        return cls(client_key=client_key, server_key=secret.server_key)

    def first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attrs = _attributes(text, "SCRAM server-first-message")
        nonce, salt_text, iterations_text = attrs.get("r", ""), attrs.get("s"), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or salt_text is None or not iterations_text.isdigit():
            raise ScramError("malformed SCRAM server-first-message")
        salt = _unb64(salt_text, "salt")
        iterations = int(iterations_text)
        if self._password is not None:
            salted = hashlib.pbkdf2_hmac("sha256", self._password.encode(), salt, iterations)
            client_key = _hmac(salted, b"Client Key")
            server_key = _hmac(salted, b"Server Key")
        else:
            assert self._client_key is not None and self._server_key is not None
            client_key, server_key = self._client_key, self._server_key
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._expected = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = _attributes(server_final.decode("utf-8", "replace"), "SCRAM server-final-message")
        if "e" in attrs:
            raise ScramError(f"the server refused: {attrs['e']}")
        if not hmac.compare_digest(_unb64(attrs.get("v", ""), "server signature"), self._expected):
            raise ScramError("the server's signature does not match: it does not know the secret")
