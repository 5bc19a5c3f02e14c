"""TLS for a listener: the settings, the certificates chosen by SNI, and their
reload. Both proxies terminate TLS with these (lb's https listeners, dbproxy's
``ssl = "terminate"``); the bytes go through proxycore/tlslayer.py.

One ``ssl.SSLContext`` per certificate/key pair, all made alike; the first pair's
is the default and every handshake starts on it, and the SNI callback moves a
handshake to the context whose certificate names the server name asked for
(nginx's ``server_name`` over ``ssl_certificate``, HAProxy's ``crt DIR``).
A reload builds a whole new set first and swaps it only when every pair
loaded: a missing file, garbage or a key that is not the certificate's keeps
the old set, with one log line (nginx's ``-s reload`` refuses the same way).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from . import tickets as ticket_keys
from .config import ConfigError, Section
from .tlslayer import TlsCounters

log = logging.getLogger("proxycore.tls")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Mozilla's "intermediate" TLS 1.2 suites (TLS 1.3's are OpenSSL's own, all good).
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


class TlsError(Exception):
    """A certificate set that cannot be used; the message names the file."""


@dataclass(frozen=True)
class CertPair:
    cert: Path  # PEM: the certificate, then its chain
    key: Path


@dataclass(frozen=True)
class TlsSettings:
    """A TLS listener's settings, named for nginx's directives."""

    certificates: tuple[CertPair, ...]  # ssl_certificate / ssl_certificate_key, the first default
    min_version: str = "1.2"  # ssl_protocols' lowest
    ciphers: str = DEFAULT_CIPHERS  # ssl_ciphers (TLS 1.2)
    reject_unknown_sni: bool = False  # ssl_reject_handshake for names no certificate has
    session_tickets: bool = True  # ssl_session_tickets
    handshake_timeout: float = 10.0  # nginx's client_header_timeout covers it
    alpn: tuple[str, ...] = ()  # "http/1.1" on lb's listeners


@dataclass(frozen=True)
class CertInfo:
    """What status pages and /metrics say of a loaded certificate."""

    file: str
    names: tuple[str, ...]
    not_after: float  # Unix time
    subject: str


def describe(cert_file: Path) -> CertInfo:
    """The leaf's names (subjectAltName's DNS names, else its CN) and expiry."""
    try:
        leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"{cert_file}: not a PEM certificate: {exc}") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return CertInfo(
        file=str(cert_file),
        names=tuple(names),
        not_after=leaf.not_valid_after_utc.timestamp(),
        subject=leaf.subject.rfc4514_string(),
    )


def _context(settings: TlsSettings, pair: CertPair | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[settings.min_version]
    # A client may not renegotiate (a CPU cost it controls; TLS 1.3 has none).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(settings.ciphers)
    if not settings.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    if settings.alpn:
        ctx.set_alpn_protocols(list(settings.alpn))
    if pair is not None:
        try:
            ctx.load_cert_chain(str(pair.cert), str(pair.key))
        except FileNotFoundError as exc:
            raise TlsError(f"{exc.filename or pair.cert}: no such file") from None
        except ssl.SSLError as exc:
            why = (exc.reason or str(exc)).lower().replace("_", " ")
            raise TlsError(f"{pair.cert} with {pair.key}: {why}") from None
        except OSError as exc:
            raise TlsError(f"{pair.cert} with {pair.key}: {exc}") from None
    return ctx


def _matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    # "*.example.com" stands for one label, as in RFC 6125
    return (
        pattern.startswith("*.")
        and "." in name
        and name.partition(".")[2] == pattern[2:]
        and bool(name.partition(".")[0])
    )


@dataclass
class CertSet:
    """One loaded generation: the default context, the others by name."""

    default: ssl.SSLContext
    contexts: list[tuple[CertInfo, ssl.SSLContext]]
    reject_unknown: bool
    infos: tuple[CertInfo, ...] = field(default=())
    tickets_shared: bool = False  # sealed with the supervisor's key (proxycore/tickets.py)

    def for_name(self, name: str) -> ssl.SSLContext | None:
        for info, ctx in self.contexts:
            if any(_matches(p, name) for p in info.names):
                return ctx
        return None


def _load(settings: TlsSettings, tickets: bytes | None = None) -> CertSet:
    if not settings.certificates:
        raise TlsError("a TLS listener needs at least one certificate and key")
    contexts = []
    for pair in settings.certificates:
        info = describe(pair.cert)
        contexts.append((info, _context(settings, pair)))
    default = contexts[0][1]
    certs = CertSet(
        default,
        contexts,
        settings.reject_unknown_sni,
        tuple(info for info, _ in contexts),
    )
    if tickets is not None and settings.session_tickets:
        # every context, though tickets are sealed with the one a handshake began on
        certs.tickets_shared = all(ticket_keys.share(ctx, tickets) for _, ctx in contexts)

    def choose(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        chosen = certs.for_name(name.lower()) if name else None
        if chosen is None:
            if certs.reject_unknown:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None  # the default's certificate
        if chosen is not default:
            sslobj.context = chosen
        return None

    if len(contexts) > 1 or settings.reject_unknown_sni:
        # (a call into Python per handshake: only when there is a choice to make)
        for _, ctx in contexts:
            ctx.sni_callback = choose
    return certs


class Certificates:
    """A listener's current certificate set; ``reload`` swaps it whole or not at all."""

    def __init__(self, settings: TlsSettings, tickets: bytes | None = None) -> None:
        self.settings = settings
        self.tickets = tickets
        self.current = _load(settings, tickets)  # TlsError on a bad first set
        self.reloads = 0
        self.reload_failures = 0

    @property
    def context(self) -> ssl.SSLContext:
        """Where a new handshake starts."""
        return self.current.default

    @property
    def infos(self) -> tuple[CertInfo, ...]:
        return self.current.infos

    def reload(self, settings: TlsSettings | None = None) -> bool:
        """Read the files again (or a new list); open connections keep theirs."""
        settings = settings or self.settings
        try:
            fresh = _load(settings, self.tickets)
        except TlsError as exc:
            self.reload_failures += 1
            log.error("TLS reload refused, the certificates before stay: %s", exc)
            return False
        self.settings = settings
        self.current = fresh
        self.reloads += 1
        return True


class TlsEnd:
    """A proxy's TLS termination on one listener (or all of dbproxy's): its
    certificates, its handshake counters, and what /status says of them."""

    def __init__(self, name: str, settings: TlsSettings, tickets: bytes | None = None) -> None:
        """``tickets``: the session ticket key this process shares with its
        supervisor's other workers (None: OpenSSL's own, for one process)."""
        self.name = name
        self.certs = Certificates(settings, tickets)
        self.counters = TlsCounters()

    @property
    def handshake_timeout(self) -> float:
        return self.certs.settings.handshake_timeout

    def reload(self, settings: TlsSettings | None = None) -> bool:
        """New certificates for new handshakes (SIGHUP, the admin API)."""
        ok = self.certs.reload(settings)
        if ok:
            names = ", ".join(n for info in self.certs.infos for n in info.names)
            log.info("%s: certificates reloaded (%s)", self.name, names)
        return ok

    def status(self) -> dict[str, object]:
        return {
            "handshakes": self.counters.as_dict(),
            "certificates": [
                {"file": i.file, "names": list(i.names), "not_after": i.not_after}
                for i in self.certs.infos
            ],
            "tickets_shared": self.certs.current.tickets_shared,
            "reloads": self.certs.reloads,
            "reload_failures": self.certs.reload_failures,
        }


def client_context(verify: bool, ca_file: Path | None, min_version: str = "1.2") -> ssl.SSLContext:
    """For a proxy's own connections to its servers over TLS."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = VERSIONS[min_version]
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_files(settings: TlsSettings, where: str) -> None:
    """Load the certificates once (a configuration check, like ``nginx -t``)."""
    try:
        _load(settings)
    except TlsError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_settings(s: Section, base: Path | None, alpn: tuple[str, ...] = ()) -> TlsSettings:
    """A TLS listener's keys (lb's [[listener]], dbproxy's [tls]); relative
    paths are the file's directory's (``base``). The files are not read here:
    ``Certificates`` loads them and says which one is wrong."""
    d = TlsSettings(certificates=())
    pairs = []
    for t in s.sections("certificates"):
        cert, key = t.string("cert", ""), t.string("key", "")
        if not cert or not key:
            raise ConfigError(f"{t.where('cert')}: every certificate needs cert and key (PEM)")
        t.done()
        pairs.append(CertPair(resolve(cert, base), resolve(key, base)))
    if not pairs:
        raise ConfigError(
            f"{s.where('certificates')}: a TLS listener needs certificates = "
            '[{ cert = "PEM", key = "PEM" }]'
        )
    return TlsSettings(
        certificates=tuple(pairs),
        min_version=s.string("min_version", d.min_version, tuple(VERSIONS)),
        ciphers=s.string("ciphers", d.ciphers),
        reject_unknown_sni=s.boolean("reject_unknown_sni", d.reject_unknown_sni),
        session_tickets=s.boolean("session_tickets", d.session_tickets),
        handshake_timeout=s.duration("handshake_timeout", d.handshake_timeout),
        alpn=alpn,
    )


def pairs_from_flags(certs: list[str], keys: list[str], flag: str) -> tuple[CertPair, ...]:
    """``--tls-cert A --tls-key A.key --tls-cert B --tls-key B.key``, in pairs."""
    if len(certs) != len(keys):
        raise ConfigError(f"{flag}: give as many keys as certificates, in the same order")
    return tuple(CertPair(Path(c), Path(k)) for c, k in zip(certs, keys, strict=True))


def resolve(value: str, base: Path | None) -> Path:
    """A path from a file, relative to the file's directory (``base``)."""
    path = Path(value)
    return path if path.is_absolute() or base is None else base / path
