"""A local certificate authority: what `stack up` makes for its TLS listeners
and what the tests trust. ECDSA P-256 keys (the benchmark's too), a CA valid
ten years and leaves valid ``days``; files in PEM, keys unencrypted and 0600.
Never for the internet: the CA's key sits beside its certificate."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path  # the leaf, then the CA (a chain, as nginx's ssl_certificate takes it)
    key: Path


@dataclass(frozen=True)
class Authority:
    cert: Path
    key: Path

    def issue(
        self,
        directory: Path,
        stem: str,
        names: list[str],
        days: int = 825,
        not_before: datetime.datetime | None = None,
    ) -> Issued:
        """A server certificate for ``names`` (DNS names or IP addresses)."""
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        issued = Issued(directory / f"{stem}.pem", directory / f"{stem}.key")
        issued.cert.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + self.cert.read_bytes()
        )
        _write_key(issued.key, key)
        return issued


def authority(directory: Path, name: str = "balance local CA") -> Authority:
    """The CA in ``directory`` (made the first time)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority(directory / "ca.pem", directory / "ca.key")
    if ca.cert.exists() and ca.key.exists():
        return ca
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(ca.key, key)
    ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main() -> None:
    """python -m stack.pki DIR NAME... [--owner UID]: the CA in DIR (made once) and
    DIR/site.pem, DIR/site.key for NAMEs (compose's tls-init; `stack up` calls
    ``authority`` itself)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m stack.pki", description=main.__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("names", nargs="+", help="DNS names or IP addresses of the certificate")
    p.add_argument("--owner", type=int, help="uid the files are given to (the proxies' user)")
    args = p.parse_args()
    site = Issued(args.directory / "site.pem", args.directory / "site.key")
    if not (site.cert.exists() and site.key.exists()):
        site = authority(args.directory).issue(args.directory, "site", args.names)
    if args.owner is not None:
        for path in args.directory.iterdir():
            os.chown(path, args.owner, args.owner)
    print(f"{site.cert}: {', '.join(args.names)}")


if __name__ == "__main__":
    main()
