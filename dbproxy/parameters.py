"""A pooled client's parameters: which startup parameters a pool carries from
client to client (all but ``replication``; ``options`` read as the server reads
it), and the SET that gives a server connection a client's. A connection logs in
with none of them, so a RESET (and the reset query's RESET ALL) returns it to
the server's defaults, not to some earlier client's."""

from __future__ import annotations

from typing import Final

# Parameters the server reports when they change (GUC_REPORT) that a client may
# SET: a client's SET of one follows it to its next connection.
FOLLOWED: Final = frozenset(
    (
        "client_encoding",
        "datestyle",
        "timezone",
        "intervalstyle",
        "standard_conforming_strings",
        "application_name",
        "default_transaction_read_only",
    )
)
# Startup parameters a pool cannot carry from client to client (pgbouncer refuses them too).
NOT_CARRIED: Final = frozenset(("replication",))


def set_statement(wanted: dict[str, str], applied: dict[str, str]) -> str:
    """The SQL that makes a connection running with the client parameters
    ``applied`` run with ``wanted`` (names lower-cased, as the server matches them)."""
    parts = []
    for name in sorted(wanted.keys() | applied.keys()):
        value = wanted.get(name)
        if value == applied.get(name):
            continue
        if value is None:
            parts.append(f"RESET {_identifier(name)}")
        else:
            parts.append(f"SET {_identifier(name)} TO '" + value.replace("'", "''") + "'")
    return "; ".join(parts)


def _identifier(name: str) -> str:
    """A parameter name as SQL, quoted: it comes from the client ("a.b": a custom one)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def startup_options(options: str) -> dict[str, str] | None:
    """The ``options`` startup parameter (libpq's PGOPTIONS) as parameters: ``-c
    name=value`` or ``--name=value``, split on spaces, a backslash escaping the
    next character, as the server reads it; None for anything else in it."""
    words, word, escaped, started = [], [], False, False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif ch.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        words.append("".join(word))
    parameters = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif w.startswith(("-c", "--")):
            setting, i = w[2:], i + 1
        else:
            return None
        name, sep, value = setting.partition("=")
        if not sep or not name:
            return None
        parameters[name.replace("-", "_").lower()] = value
    return parameters


def carried(
    parameters: dict[str, str], ignored: tuple[str, ...]
) -> tuple[dict[str, str], str | None]:
    """The parameters of a startup packet a pool carries (names lower-cased, as
    the server matches them), and the name of one it cannot carry, if any."""
    wanted: dict[str, str] = {}
    for name, value in parameters.items():
        if name in ("user", "database") or name in ignored:
            continue
        these = startup_options(value) if name == "options" else {name.lower(): value}
        if these is None or name in NOT_CARRIED:
            return wanted, name
        wanted.update(these)
    return wanted, None
