"""lb's TLS listeners on real processes: curl, Python's ssl and openssl s_client
through them; SNI, HSTS, X-Forwarded-Proto, the redirect of a plain listener,
resumption, certificate reload under load, workers, and hostile handshakes."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxycore import tickets
from proxycore.tls import Certificates, CertPair, TlsSettings
from stack.pki import Authority, Issued, authority
from tests.browser import page_text
from tests.lbctl import FAST_CHECKS, Lb, Upstream, lb_with
from tests.stackctl import free_ports

HOST = "127.0.0.1"


class Site:
    """An lb with three listeners beside its plain one, and what they use."""

    def __init__(self, lb: Lb, tmp: Path, ca: Authority, ports: dict[str, int]) -> None:
        self.lb, self.tmp, self.ca, self.ports = lb, tmp, ca, ports
        self.context = ssl.create_default_context(cafile=str(ca.cert))


def listeners(tmp: Path, ca: Authority, ports: dict[str, int], timeout: str = "1s") -> str:
    site = ca.issue(tmp, "site", ["localhost", "127.0.0.1"])
    api = ca.issue(tmp, "api", ["api.example.test", "*.api.example.test"])
    # the https listener's paths are relative: the file's directory is theirs
    return f"""
[[listener]]
name = "https"
address = "{HOST}:{ports["https"]}"
tls = true
hsts = "max-age=63072000"
handshake_timeout = "{timeout}"
certificates = [
  {{ cert = "{site.cert.name}", key = "{site.key.name}" }},
  {{ cert = "{api.cert}", key = "{api.key}" }},
]

[[listener]]
name = "strict"
address = "{HOST}:{ports["strict"]}"
tls = true
reject_unknown_sni = true
certificates = [{{ cert = "{api.cert}", key = "{api.key}" }}]

[[listener]]
name = "redirect"
address = "{HOST}:{ports["redirect"]}"
redirect_https = true
"""


@contextlib.contextmanager
def tls_site(tmp: Path, extra_settings: str = "") -> Iterator[Site]:
    ca = authority(tmp / "ca")
    ports = dict(zip(("https", "strict", "redirect"), free_ports(3), strict=True))
    settings = extra_settings + FAST_CHECKS + listeners(tmp, ca, ports)
    with lb_with(tmp, names=("a",), settings=settings) as (lb, _):
        yield Site(lb, tmp, ca, ports)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with tls_site(tmp_path_factory.mktemp("lb-tls")) as s:
        yield s


@dataclass
class Handshake:
    version: str | None
    session: ssl.SSLSession | None
    session_reused: bool


def fetch(
    port: int,
    context: ssl.SSLContext,
    name: str | None = "localhost",
    path: str = "/echo",
    session: ssl.SSLSession | None = None,
) -> tuple[bytes, Handshake]:
    """One request on a new TLS connection: the raw response, and the handshake."""
    request = f"GET {path} HTTP/1.1\r\nHost: {name or HOST}\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name, session=session) as tls,
    ):
        tls.sendall(request.encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data, Handshake(tls.version(), tls.session, tls.session_reused)


def peer_cn(port: int, name: str | None, context: ssl.SSLContext | None = None) -> str:
    ctx = context or ssl._create_unverified_context()
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def tls_status(lb: Lb, name: str = "https") -> dict:
    return lb.status()["listeners"][name]


def openssl(port: int, *args: str, stdin: bytes = b"") -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", *args],
        input=stdin,
        capture_output=True,
        timeout=20,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


def test_curl_python_and_openssl_reach_the_upstream_over_https(site: Site) -> None:
    port = site.ports["https"]
    out = subprocess.run(
        ["curl", "-sS", "-D", "-", "--cacert", str(site.ca.cert), f"https://localhost:{port}/echo"],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "strict-transport-security: max-age=63072000" in head.lower()
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"localhost:{port}"

    data, tls = fetch(port, site.context)
    assert data.startswith(b"HTTP/1.1 200")
    assert tls.version in ("TLSv1.3", "TLSv1.2")

    ca = str(site.ca.cert)
    text = openssl(port, "-servername", "localhost", "-alpn", "http/1.1", "-CAfile", ca)
    assert "ALPN protocol: http/1.1" in text
    assert "Verify return code: 0 (ok)" in text

    # the plain listener beside it still says http
    (r,) = _plain_get(site.lb.port, "/echo")
    assert b"strict-transport-security" not in r.lower()
    assert b'"X-Forwarded-Proto", "http"' in r


def _plain_get(port: int, path: str, host: str = "site.example") -> list[bytes]:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [data]


def test_sni_picks_the_certificate(site: Site) -> None:
    port, strict = site.ports["https"], site.ports["strict"]
    assert peer_cn(port, "localhost") == "CN=localhost"
    assert peer_cn(port, "api.example.test") == "CN=api.example.test"
    assert peer_cn(port, "v2.api.example.test") == "CN=api.example.test"  # the wildcard
    assert peer_cn(port, "a.b.api.example.test") == "CN=localhost"  # one label only
    assert peer_cn(port, "unknown.test") == "CN=localhost"  # the default
    assert peer_cn(port, None) == "CN=localhost"  # no SNI at all
    # verified against the CA, each name gets a certificate that names it
    data, _ = fetch(port, site.context, name="x.api.example.test")
    assert data.startswith(b"HTTP/1.1 200")

    # reject_unknown_sni (nginx's ssl_reject_handshake): an unknown name, or none, fails
    assert peer_cn(strict, "api.example.test") == "CN=api.example.test"
    for name in ("unknown.test", None):
        with pytest.raises(ssl.SSLError):
            peer_cn(strict, name)
    assert tls_status(site.lb, "strict")["handshakes"]["failures"].get("unknown_sni", 0) >= 2


def test_plain_listener_redirects_to_https(site: Site) -> None:
    (r,) = _plain_get(site.ports["redirect"], "/a/b?x=1", host="site.example:8080")
    head = r.decode().lower()
    assert head.startswith("http/1.1 308")
    assert f"location: https://site.example:{site.ports['https']}/a/b?x=1" in head


def test_plain_http_garbage_and_old_protocols_are_refused_cleanly(site: Site) -> None:
    port = site.ports["https"]
    (r,) = _plain_get(port, "/echo")
    head, _, body = r.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
    assert json.loads(body)["message"] == "The plain HTTP request was sent to HTTPS port"

    def closed_after(data: bytes) -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got

    assert closed_after(b"\x00\x01garbage\xff" * 10) == b""
    # a TLS record that is no ClientHello: an alert, then the close
    assert closed_after(b"\x16\x03\x01\x00\x05abcde")[:1] in (b"\x15", b"")
    # a ClientHello as large as a record can be, and garbage
    assert closed_after(b"\x16\x03\x01\x40\x00" + b"\x01" * 0x4000)[:1] in (b"\x15", b"")
    for old in ("-tls1", "-tls1_1"):
        text = openssl(port, old, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost")
        assert "alert protocol version" in text or "no protocols available" in text, text
    failures = tls_status(site.lb)["handshakes"]["failures"]
    assert failures.get("not_tls", 0) >= 2
    assert failures.get("protocol_version", 0) >= 1
    assert "Traceback" not in site.lb.log_text()
    data, _ = fetch(port, site.context)  # and the listener serves on
    assert data.startswith(b"HTTP/1.1 200")


def test_a_cut_short_client_hello_is_closed_at_the_handshake_timeout(site: Site) -> None:
    port = site.ports["https"]
    # the first bytes of a real ClientHello, made by OpenSSL itself
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(hello[:40])
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by lb, not by our timeout
        assert time.monotonic() - started < 8
    assert tls_status(site.lb)["handshakes"]["failures"].get("timeout", 0) >= 1


def test_resumption_and_renegotiation(site: Site) -> None:
    port = site.ports["https"]
    _, first = fetch(port, site.context)
    assert not first.session_reused and first.session is not None
    _, second = fetch(port, site.context, session=first.session)
    assert second.session_reused
    assert tls_status(site.lb)["handshakes"]["resumed"] >= 1

    # a TLS 1.2 client asking to renegotiate is refused; the listener serves on
    text = openssl(port, "-tls1_2", "-servername", "localhost", stdin=b"R\n")
    assert "RENEGOTIATING" in text and "no renegotiation" in text, text
    data, _ = fetch(port, site.context)
    assert data.startswith(b"HTTP/1.1 200")


def test_stalled_handshakes_cost_a_good_client_nothing(site: Site) -> None:
    port = site.ports["https"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    stalled: list[socket.socket] = []
    try:
        for _ in range(2000):
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(b"\x16\x03\x01")  # a record begun, never ended
            stalled.append(s)
        data, _ = fetch(port, site.context)
        assert data.startswith(b"HTTP/1.1 200")
        # all of them closed by lb once the handshake timeout (1 s) passes
        deadline = time.monotonic() + 20
        while tls_status(site.lb)["handshakes"]["handshaking"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tls_status(site.lb)["handshakes"]["handshaking"] == 0
        for s in stalled[:50]:
            s.settimeout(5)
            assert s.recv(10) == b""
    finally:
        for s in stalled:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    data, _ = fetch(port, site.context)
    assert data.startswith(b"HTTP/1.1 200")


def test_metrics_tell_handshakes_and_expiry(site: Site) -> None:
    fetch(site.ports["https"], site.context)
    with urllib.request.urlopen(site.lb.admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'lb_tls_handshakes_total{listener="https"}' in text
    assert 'lb_tls_version_total{listener="https",version="TLSv1.3"}' in text
    expiry = [
        line
        for line in text.splitlines()
        if line.startswith("lb_tls_certificate_expiry_timestamp_seconds{") and "localhost" in line
    ]
    assert expiry and float(expiry[0].split()[-1]) > time.time() + 86400 * 800
    # the status page: each listener, its handshakes and its certificates' days left
    text = page_text(site.lb.admin + "/status.html")
    assert "listeners" in text and "handshakes" in text, text[:400]
    assert "api.example.test" in text and "days left" in text
    assert "plain, redirects to https" in text


def _serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_reload_swaps_certificates_under_load_and_refuses_a_bad_pair(tmp_path: Path) -> None:
    with tls_site(tmp_path) as s:
        port = s.ports["https"]
        before = _serial(port, s.context)
        failures: list[str] = []
        done = threading.Event()
        count = [0]

        def load() -> None:
            while not done.is_set():
                try:
                    data, _ = fetch(port, s.context)
                    if not data.startswith(b"HTTP/1.1 200"):
                        failures.append(data[:60].decode(errors="replace"))
                    count[0] += 1
                except (OSError, ssl.SSLError) as exc:
                    failures.append(repr(exc))

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            serials = {before}
            for _ in range(3):
                s.ca.issue(s.tmp, "site", ["localhost", "127.0.0.1"])  # renewed in place
                s.lb.signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while _serial(port, s.context) in serials and time.monotonic() < deadline:
                    time.sleep(0.1)
                now = _serial(port, s.context)
                assert now not in serials
                serials.add(now)
            deadline = time.monotonic() + 20
            while count[0] < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            done.set()
            for w in workers:
                w.join()
        assert failures == [], failures[:5]
        assert count[0] >= 100

        good = _serial(port, s.context)
        cert = s.tmp / "site.pem"
        kept = cert.read_bytes()
        cert.write_bytes(b"not a certificate\n")
        s.lb.signal(signal.SIGHUP)
        code, body = _post(s.lb.admin + "/tls/reload")
        assert code == 409 and body["reloaded"]["https"] is False
        # a key that is not the certificate's
        other = s.ca.issue(s.tmp, "other", ["localhost"])
        cert.write_bytes(other.cert.read_bytes())
        code, _ = _post(s.lb.admin + "/tls/reload")
        assert code == 409
        assert _serial(port, s.context) == good  # the old pair serves on
        log = s.lb.log_text()
        assert "reload refused" in log and "Traceback" not in log
        assert tls_status(s.lb)["reload_failures"] >= 2

        cert.write_bytes(kept)
        code, body = _post(s.lb.admin + "/tls/reload")
        assert code == 200 and body["reloaded"] == {"https": True, "strict": True}


def test_workers_each_serve_tls_and_resume_each_other_s_sessions(tmp_path: Path) -> None:
    with tls_site(tmp_path, "workers = 2\n") as s:
        port = s.ports["https"]
        for _ in range(20):
            data, _ = fetch(port, s.context)
            assert data.startswith(b"HTTP/1.1 200")
        # the supervisor's /status sums its workers' handshakes
        assert tls_status(s.lb)["handshakes"]["handshakes"] >= 20
        assert tls_status(s.lb)["tickets_shared"]

        # A ticket sealed by one worker opens a session on the other: with a key
        # for each, about half of these would be full handshakes. Ten at once,
        # so that both workers take some.
        _, first = fetch(port, s.context)
        resumed: list[bool] = []

        def again() -> None:
            data, handshake = fetch(port, s.context, session=first.session)
            assert data.startswith(b"HTTP/1.1 200")
            resumed.append(handshake.session_reused)

        for _ in range(4):
            threads = [threading.Thread(target=again) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert resumed == [True] * 40


def test_bad_tls_configuration_is_refused_naming_the_file(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    site: Issued = ca.issue(tmp_path, "site", ["localhost"])
    upstream = Upstream("a", free_ports(1)[0], tmp_path / "up.log")
    cases = {
        "missing.pem": f'certificates = [{{ cert = "missing.pem", key = "{site.key}" }}]',
        "key values mismatch": (f'certificates = [{{ cert = "{site.cert}", key = "{ca.key}" }}]'),
        "needs certificates": "",
    }
    for expected, line in cases.items():
        config = tmp_path / "lb.toml"
        config.write_text(
            f'listen = "{HOST}:1"\n[[server]]\naddress = "{upstream.address}"\n'
            f'[[listener]]\nname = "https"\naddress = "{HOST}:2"\ntls = true\n{line}\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "lb", "--config", str(config), "--check-config"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_upstreams_over_tls_verified_against_a_ca(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    leaf = ca.issue(tmp_path, "upstream", ["localhost", "127.0.0.1"])
    stranger = authority(tmp_path / "other-ca", "another CA")
    port, lb_port, admin = free_ports(3)
    upstream = Upstream("a", port, tmp_path / "up.log", tls=(str(leaf.cert), str(leaf.key)))
    lb = Lb(lb_port, admin, tmp_path / "lb.toml", tmp_path / "lb.log")

    def configure(tls: str) -> None:
        lb.config.write_text(
            f'listen = "{HOST}:{lb_port}"\nadmin = "{HOST}:{admin}"\n{FAST_CHECKS}\n'
            f'[upstream_tls]\n{tls}\n[[server]]\nname = "a"\naddress = "{upstream.address}"\n'
        )

    configure(f'ca_file = "{ca.cert}"\nserver_name = "localhost"')
    try:
        upstream.start()
        lb.start()
        deadline = time.monotonic() + 10
        while lb.server_status("a")["state"] != "UP" and time.monotonic() < deadline:
            time.sleep(0.1)
        (r,) = _plain_get(lb.port, "/echo")
        assert r.startswith(b"HTTP/1.1 200"), r[:200]
        # a certificate no trusted CA signed: the check marks the server down
        configure(f'ca_file = "{stranger.cert}"')
        lb.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while lb.server_status("a")["state"] == "UP" and time.monotonic() < deadline:
            time.sleep(0.1)
        status = lb.server_status("a")
        assert status["state"] != "UP"
        assert "certificate verify failed" in json.dumps(status["last_check"]), status
        # verify = false (nginx's default) takes it whatever signed it
        configure("verify = false")
        lb.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while lb.server_status("a")["state"] != "UP" and time.monotonic() < deadline:
            time.sleep(0.1)
        (r,) = _plain_get(lb.port, "/echo")
        assert r.startswith(b"HTTP/1.1 200"), r[:200]
        assert "Traceback" not in lb.log_text()
    finally:
        lb.stop()
        upstream.kill()


@pytest.mark.parametrize(
    ("listeners", "expected"),
    [
        ('[[listener]]\nname = "x"\naddress = "127.0.0.1:2"\nhsts = "max-age=1"\n', "only a TLS"),
        ('[[listener]]\nname = "http"\naddress = "127.0.0.1:2"\n', "names must differ"),
        ('[[listener]]\nname = "x"\naddress = "127.0.0.1:1"\n', "two listeners on one address"),
        ('[[listener]]\nname = "x"\naddress = "127.0.0.1:2"\nredirect_https = true\n', "a TLS"),
        ('[[listener]]\naddress = "127.0.0.1:2"\n', "needs a name"),
        ('[[listener]]\nname = "x"\n', "needs an address"),
        ('[[listener]]\nname = "x"\naddress = "127.0.0.1:2"\ntls = true\nbogus = 1\n', "bogus"),
    ],
)
def test_listener_tables_are_checked_naming_the_key(
    tmp_path: Path, listeners: str, expected: str
) -> None:
    from lb.config import load
    from proxycore.config import ConfigError

    config = tmp_path / "lb.toml"
    config.write_text(
        f'listen = "{HOST}:1"\n[[server]]\naddress = "{HOST}:3"\n{listeners}'
        f'certificates = [{{ cert = "a.pem", key = "a.key" }}]\n'
        if "tls = true" in listeners
        else f'listen = "{HOST}:1"\n[[server]]\naddress = "{HOST}:3"\n{listeners}'
    )
    with pytest.raises(ConfigError, match=expected) as raised:
        load(config)
    assert str(config) in str(raised.value)


def test_ticket_keys_reach_every_context_and_stay_over_a_reload(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    pairs = tuple(
        CertPair(i.cert, i.key)
        for i in (ca.issue(tmp_path, "site", ["localhost"]), ca.issue(tmp_path, "api", ["api"]))
    )
    keys = tickets.new_keys()
    certs = Certificates(TlsSettings(certificates=pairs), keys)
    assert certs.current.tickets_shared
    assert [tickets.keys_of(ctx) for _, ctx in certs.current.contexts] == [keys, keys]
    assert certs.reload() and tickets.keys_of(certs.context) == keys
    own = Certificates(TlsSettings(certificates=pairs))  # one process: OpenSSL's own key
    assert not own.current.tickets_shared and tickets.keys_of(own.context) not in (None, keys)
    with pytest.raises(ValueError):
        tickets.share(own.context, b"short")
