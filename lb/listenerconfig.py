"""lb's listeners as its file and flags give them: `listen` (the plain one,
named "http"), `[[listener]]` tables beside their nginx/HAProxy twins, and
`--tls-listen` with its certificates; checked here, their certificate files
loaded by ``check_certificates`` (at start and with --check-config)."""

from __future__ import annotations

import argparse
from pathlib import Path

from proxycore.config import ConfigError, Section, parse_address
from proxycore.tls import CertPair, TlsSettings, check_files, pairs_from_flags, read_settings

from .settings import LbConfig, ListenerConfig

ALPN = ("http/1.1",)


def read_listeners(root: Section, base: Path | None) -> tuple[ListenerConfig, ...]:
    listeners = []
    for s in root.sections("listener"):
        name = s.string("name", "")
        if not name:
            raise ConfigError(f"{s.where('name')}: every [[listener]] needs a name")
        address = s.address("address", None)
        if address is None:
            raise ConfigError(f"{s.where('address')}: every [[listener]] needs an address")
        tls = read_settings(s, base, ALPN) if s.boolean("tls", False) else None
        redirect = s.boolean("redirect_https", False)
        hsts = s.string("hsts", "")
        if tls is None and hsts:
            raise ConfigError(f"{s.where('hsts')}: only a TLS listener sends HSTS")
        if tls is not None and redirect:
            raise ConfigError(f"{s.where('redirect_https')}: is for a plain listener")
        s.done()
        listeners.append(ListenerConfig(name, address, tls, redirect, hsts))
    return tuple(listeners)


def check_listeners(config: LbConfig, where: str) -> None:
    listeners = config.all_listeners
    if not listeners:
        raise ConfigError(f"{where}: no listener (listen is off and no [[listener]])")
    names = [x.name for x in listeners]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: listener names must differ: {', '.join(names)}")
    addresses = [x.address for x in listeners]
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"{where}: two listeners on one address")
    if any(x.redirect_https for x in listeners) and not any(x.tls for x in listeners):
        raise ConfigError(f"{where}: redirect_https needs a TLS listener to redirect to")


def check_certificates(config: LbConfig) -> None:
    """Every TLS listener's certificates load (at start and with --check-config, as
    nginx -t reads them). Not on a reload: there a set that does not load is
    refused by the listener, which keeps the one it has."""
    for x in config.all_listeners:
        if x.tls is not None:
            where = f"{config.source or 'flags'}: listener {x.name}"
            check_files(x.tls, where)


def tls_flags(args: argparse.Namespace, config: LbConfig) -> tuple[ListenerConfig, ...]:
    """--tls-listen with its --tls-cert/--tls-key pairs: the listener "https"
    (replacing the file's of that name)."""
    if not args.tls_listen or not args.tls_cert:
        raise ConfigError("--tls-listen needs --tls-cert PEM --tls-key PEM (and they it)")
    pairs: tuple[CertPair, ...] = pairs_from_flags(args.tls_cert, args.tls_key, "--tls-key")
    listener = ListenerConfig(
        "https",
        parse_address(args.tls_listen, "--tls-listen"),
        TlsSettings(certificates=pairs, alpn=ALPN),
    )
    return (*(x for x in config.listeners if x.name != "https"), listener)
