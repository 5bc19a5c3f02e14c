"""Which modules make the hot path, and whether this checkout runs them compiled.

The modules below are plain, fully typed Python. `make setup` compiles them
with mypyc (as black and mypy ship themselves) into C extensions that sit next
to their sources; CPython then imports the extension first. Measured on the
2-core machine (README, "Compiled hot path"): same code, fewer microseconds per
request in lb and per message in dbproxy. Without a C compiler nothing is
built and the same sources run as they are.

An extension built from another version of its source would run that
version without a word, so the build records each source's hash (MANIFEST)
and importing lb or dbproxy checks them first (``require_fresh``). Hashes, not
file times: a checkout, a wheel install or a container copy all reset those.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.machinery
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

ROOT = Path(__file__).resolve().parent.parent

# One list for the build (scripts/compile_hot.py) and for the checks below.
HOT_MODULES = (
    "proxycore.config",
    "proxycore.servers",
    "proxycore.deadline",
    "proxycore.flow",
    "proxycore.balancing",
    "proxycore.histogram",
    "proxycore.tlslayer",
    "lb.settings",
    "lb.config",
    "lb.metrics",
    "lb.routing",
    "lb.ratelimit",
    "lb.accesslog",
    "lb.pools",
    "lb.routes",
    "lb.state",
    "lb.app",
    "lb.heads",
    "lb.request_head",
    "lb.response_head",
    "lb.plain",
    "lb.plain_request",
    "lb.framing",
    "lb.retry",
    "lb.hedgepolicy",
    "lb.upstream",
    "lb.downstream",
    "lb.reading",
    "lb.client",
    "lb.attempts",
    "lb.hedging",
    "lb.exchange",
    "dbproxy.pgwire",
    "dbproxy.routing",
    "dbproxy.app",
    "dbproxy.choice",
    "dbproxy.clientend",
    "dbproxy.serverside",
    "dbproxy.dialing",
    "dbproxy.session",
    "dbproxy.listener",
    "dbproxy.cancels",
    "dbproxy.sessionqueue",
    "dbproxy.prepared",
    "dbproxy.serverlogin",
    "dbproxy.serverconn",
    "dbproxy.pool",
    "dbproxy.auth",
    "dbproxy.parameters",
    "dbproxy.transactions",
    "dbproxy.pooledlogin",
    "dbproxy.pooled",
)
# mypyc puts the code of all of them in one shared library, inside this package.
GROUP = "proxycore._hot"
# "module sha256" per line: the sources the extensions were built from.
MANIFEST = "_hot_sources.txt"


class StaleBuild(ImportError):
    pass


def source_of(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def extension_of(module: str, root: Path = ROOT) -> Path | None:
    source = source_of(module, root)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = source.with_name(source.stem + suffix)
        if built.exists():
            return built
    return None


def source_hash(module: str, root: Path = ROOT) -> str:
    return hashlib.sha256(source_of(module, root).read_bytes()).hexdigest()


def write_manifest(modules: tuple[str, ...] = HOT_MODULES, root: Path = ROOT) -> None:
    """Called by the build, right after it compiled ``modules``."""
    lines = [f"{m} {source_hash(m, root)}\n" for m in modules]
    (root / "proxycore" / MANIFEST).write_text("".join(lines))


def stale(modules: tuple[str, ...] = HOT_MODULES, root: Path = ROOT) -> list[str]:
    """Hot modules whose compiled extension was not built from their present source."""
    built = [m for m in modules if extension_of(m, root) is not None]
    if not built:
        return []
    manifest = root / "proxycore" / MANIFEST
    recorded = {}
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            module, _, digest = line.partition(" ")
            recorded[module] = digest
    return [m for m in built if recorded.get(m) != source_hash(m, root)]


def require_fresh() -> None:
    changed = stale()
    if changed:
        raise StaleBuild(
            f"compiled {', '.join(changed)} from another version of the source: "
            "run `make setup` to rebuild, or `make pure` to run the sources as they are"
        )


def is_compiled(module: object) -> bool:
    """Whether an imported module is the mypyc-built extension (not the .py file)."""
    return not str(getattr(module, "__file__", "")).endswith(".py")


def hot_path() -> str:
    """For the startup line and /status: 'compiled' or 'interpreted'."""
    from . import flow

    return "compiled" if is_compiled(flow) else "interpreted"


P = TypeVar("P")


def protocol_factory(factory: Callable[[], P]) -> Callable[[], asyncio.BaseProtocol]:
    """For loop.create_server / create_connection: our protocol classes do not
    inherit asyncio.Protocol, because mypyc compiles a class with a Python base
    into a plain Python class (attributes in a dict) and one without into a C
    struct. The loop only calls the methods by name (uvloop checks for
    BufferedProtocol alone), so the classes keep the Protocol's method set."""
    return cast("Callable[[], asyncio.BaseProtocol]", factory)
