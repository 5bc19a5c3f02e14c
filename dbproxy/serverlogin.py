"""dbproxy logging in to a server as a client it authenticated itself (a pooled
server connection): the startup packet, then the server's authentication
requests answered with what the client's own login gave dbproxy (its SCRAM
ClientKey, or its md5 secret), never a password, until ReadyForQuery.

Pure: ``ServerLogin.start()`` gives the startup packet; ``feed(data)`` takes
the server's bytes as they come and gives what to send back; it ends ``ready``
(with the server's parameters and BackendKeyData) or ``failed`` (with the
server's ErrorResponse, or dbproxy's reason).
"""

from __future__ import annotations

import struct
from typing import Final

from .auth import md5_answer, md5_secret
from .scram import MECHANISM, ClientExchange, ScramError, Secret

_INT32: Final = struct.Struct("!i")
_TWO_INT32: Final = struct.Struct("!ii")
PROTOCOL_3_0: Final = 196608


def startup_packet(parameters: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in parameters.items()) + b"\0"
    return _INT32.pack(len(body) + 8) + _INT32.pack(PROTOCOL_3_0) + body


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


class ServerLogin:
    def __init__(
        self,
        parameters: dict[str, str],
        *,
        client_key: bytes | None = None,
        scram_secret: Secret | None = None,
        md5: str | None = None,
        password: str | None = None,
    ) -> None:
        """``parameters``: the startup's (user, database, application_name ...);
        the credentials: the password (an auth file's plain one), or a SCRAM
        ClientKey with the secret it was checked against, or an md5 secret, or
        none (a server that trusts dbproxy)."""
        self._parameters = parameters
        self._password = password
        self._client_key = client_key
        self._scram_secret = scram_secret
        self._md5 = md5
        self._scram: ClientExchange | None = None
        self._buffer = b""
        self.ready = False
        self.failed = False
        self.error = b""  # the server's ErrorResponse, whole, when it refused
        self.reason = ""  # why, in words (never a secret)
        self.server_parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None

    def start(self) -> bytes:
        return startup_packet(self._parameters)

    def feed(self, data: bytes) -> bytes:
        """The server's bytes; what to send it back (b"": nothing yet)."""
        self._buffer += data
        out = []
        while not (self.ready or self.failed) and len(self._buffer) >= 5:
            kind = self._buffer[:1]
            (length,) = _INT32.unpack_from(self._buffer, 1)
            if length < 4:
                self._fail("the server sent a message of an impossible length")
                break
            if len(self._buffer) < 1 + length:
                break
            body = self._buffer[5 : 1 + length]
            self._buffer = self._buffer[1 + length :]
            out.append(self._message(kind, body))
        return b"".join(out)

    @property
    def leftover(self) -> bytes:
        """What the server sent after ReadyForQuery (nothing, in a login)."""
        return self._buffer

    def _message(self, kind: bytes, body: bytes) -> bytes:
        if kind == b"R":
            return self._authentication(body)
        if kind == b"S":
            name, _, rest = body.partition(b"\0")
            self.server_parameters[name.decode()] = rest.rstrip(b"\0").decode()
        elif kind == b"K" and len(body) == 8:
            self.backend_key = _TWO_INT32.unpack(body)
        elif kind == b"Z":
            self.ready = True
        elif kind == b"E":
            self.error = _message(kind, body)
            self._fail("the server refused the login")
        # N (NoticeResponse) and anything else before ReadyForQuery: nothing to do
        return b""

    def _authentication(self, body: bytes) -> bytes:
        (code,) = _INT32.unpack_from(body)
        data = body[4:]
        try:
            if code == 0:
                return b""
            password = self._password
            if code == 3 and password is not None:
                return _message(b"p", password.encode() + b"\0")
            if code == 5 and password is not None:
                secret = md5_secret(self._parameters.get("user", ""), password)
                return _message(b"p", md5_answer(secret, data[:4]) + b"\0")
            if code == 5 and self._md5 is not None:
                return _message(b"p", md5_answer(self._md5, data[:4]) + b"\0")
            if code == 10 and (
                password is not None
                or (self._client_key is not None and self._scram_secret is not None)
            ):
                if MECHANISM.encode() not in data.split(b"\0"):
                    return self._fail("the server offers no SCRAM-SHA-256")
                if password is not None:
                    self._scram = ClientExchange(password=password)
                else:
                    assert self._client_key is not None and self._scram_secret is not None
                    self._scram = ClientExchange.from_keys(self._client_key, self._scram_secret)
                first = self._scram.first()
                return _message(b"p", MECHANISM.encode() + b"\0" + _INT32.pack(len(first)) + first)
            if code == 11 and self._scram is not None:
                return _message(b"p", self._scram.final(data))
            if code == 12 and self._scram is not None:
                self._scram.verify(data)
                return b""
        except ScramError as exc:
            return self._fail(f"SCRAM with the server failed: {exc}")
        return self._fail(f"the server asks for authentication dbproxy cannot give (code {code})")

    def _fail(self, reason: str) -> bytes:
        self.failed = True
        self.reason = reason
        return b""
