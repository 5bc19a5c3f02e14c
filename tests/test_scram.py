"""SCRAM-SHA-256 both ways, without sockets: RFC 7677's exchange, a wrong
password, and dbproxy logging in as a client with only what the client's own
login gave away (dbproxy/scram.py)."""

from __future__ import annotations

import base64

import pytest

from dbproxy.scram import ClientExchange, ScramError, Secret, ServerExchange

# RFC 7677, section 3
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def test_rfc_7677_exchange() -> None:
    secret = Secret.of_password("pencil", SALT, 4096)
    client = ClientExchange(password="pencil", nonce=CLIENT_NONCE, user="user")
    server = ServerExchange(secret, nonce=SERVER_NONCE)
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = server.first(client.first())
    assert server_first == (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    client_final = client.final(server_first)
    assert client_final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    server_final = server.final(client_final)
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify(server_final)


def test_a_secret_reads_and_writes_as_pg_authid_keeps_it() -> None:
    secret = Secret.of_password("pencil", SALT, 4096)
    assert Secret.parse(str(secret)) == secret
    assert str(secret).startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert "pencil" not in repr(secret) and str(secret.stored_key) not in repr(secret)
    for bad in ("md5abc", "SCRAM-SHA-256$x:y$z:w", "SCRAM-SHA-256$4096:!!$a:b"):
        with pytest.raises(ScramError):
            Secret.parse(bad)


def test_a_wrong_password_fails_and_gives_no_key() -> None:
    server = ServerExchange(Secret.of_password("right"))
    client = ClientExchange(password="wrong")
    final = client.final(server.first(client.first()))
    with pytest.raises(ScramError, match="password authentication failed"):
        server.final(final)
    assert server.client_key is None


def test_dbproxy_logs_in_to_a_server_with_the_key_the_client_gave_away() -> None:
    secret = Secret.of_password("s3cret")  # what the server (and dbproxy's auth_query) keep
    # the client logs in to dbproxy
    client = ClientExchange(password="s3cret")
    front = ServerExchange(secret)
    client.verify(front.final(client.final(front.first(client.first()))))
    assert front.client_key is not None
    # dbproxy logs in to the server as that client, with no password
    back = ServerExchange(secret)  # the server's side of it
    as_client = ClientExchange.from_keys(front.client_key, secret)
    as_client.verify(back.final(as_client.final(back.first(as_client.first()))))


def test_malformed_messages_are_refused_not_crashed_on() -> None:
    server = ServerExchange(Secret.of_password("x"))
    for bad in (b"", b"p=tls-server-end-point,,n=,r=abc", b"n,,r", b"n,a=admin,n=,r=x", b"\xff"):
        with pytest.raises(ScramError):
            ServerExchange(Secret.of_password("x")).first(bad)
    server.first(b"n,,n=,r=abc")
    for bad in (b"c=biws,r=abc", b"c=biws,r=wrong,p=AAAA", b"c=biws,r=abc" + b"x,p=!!"):
        with pytest.raises(ScramError):
            server.final(bad)
