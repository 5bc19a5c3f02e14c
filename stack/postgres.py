"""The two Postgres clusters of the stack: find the binaries, initdb, configure, bootstrap."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import string
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncpg

from .errors import StackError

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "infra" / "postgres"
DATABASE = "users"
SUPERUSER = "postgres"
REQUIRED_BINARIES = ("initdb", "postgres")
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found. Install them with "
    "`apt-get install postgresql-15` (or run `make test`, which does it as root), "
    "or point BALANCE_PG_BINDIR at their directory."
)


def find_bindir(
    env: Mapping[str, str] | None = None, debian_root: Path = Path("/usr/lib/postgresql")
) -> Path:
    env = os.environ if env is None else env
    candidates: list[Path] = []
    if env_dir := env.get("BALANCE_PG_BINDIR"):
        candidates.append(Path(env_dir))
    if pg_config := shutil.which("pg_config", path=env.get("PATH", "")):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
        except (subprocess.SubprocessError, OSError):
            pass
    # Debian's layout: the version the project is built on first, then the newest.
    if debian_root.is_dir():
        versions = sorted(
            (p for p in debian_root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates += [debian_root / "15" / "bin"] + [v / "bin" for v in reversed(versions)]
    for candidate in candidates:
        if all((candidate / b).is_file() for b in REQUIRED_BINARIES):
            return candidate
    raise StackError(INSTALL_HINT)


def run_as() -> str | None:
    """The system user the clusters run as: `postgres` when we are root (Postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise StackError(
            "running as root, but there is no `postgres` system user to run the clusters as; "
            "installing postgresql-15 creates it"
        ) from None
    return SUPERUSER


def reachable_by(path: Path, user: str | None) -> bool:
    """Whether ``user`` can traverse every directory down to ``path``."""
    if user is None:
        return True
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _run(argv: Sequence[str], user: str | None, what: str) -> None:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        user=user,
        group=user,
        extra_groups=[] if user else None,
        timeout=120,
    )
    if result.returncode != 0:
        raise StackError(f"{what} failed:\n{result.stdout}{result.stderr}")


def initdb(bindir: Path, datadir: Path, user: str | None) -> None:
    if datadir.exists():
        shutil.rmtree(datadir)
    datadir.mkdir(parents=True, mode=0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            SUPERUSER,
            # C collation: text orders by code point, so b-tree range scans serve
            # prefix search (see infra/postgres/schema.sql).
            "--locale=C",
            "--encoding=UTF8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ],
        user,
        f"initdb of {datadir}",
    )


def configure(datadir: Path, port: int, *, publisher: bool) -> None:
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(port),
        "unix_socket_directories": "''",
        "max_connections": "200",
        "password_encryption": "'scram-sha-256'",
        # A disposable local stack: durability against OS crashes buys nothing
        # here, and kill -9 of postgres loses nothing without it (the page cache
        # stays). synchronous_commit stays on: walsenders ship only flushed WAL,
        # and without a flush per commit the replica would trail by up to
        # wal_writer_delay (200 ms).
        "fsync": "off",
        "full_page_writes": "off",
        # A subscriber reconnects to a restarted publisher this soon.
        "wal_retrieve_retry_interval": "'1s'",
        "log_min_messages": "warning",
        "log_line_prefix": "'%m [%p] %q%u@%d '",
    }
    if publisher:
        settings.update(wal_level="logical", max_wal_senders="10", max_replication_slots="10")
    lines = [f"{key} = {value}" for key, value in settings.items()]
    (datadir / "balance.conf").write_text(
        "# written by python -m stack\n" + "\n".join(lines) + "\n"
    )
    with open(datadir / "postgresql.conf", "a") as conf:
        conf.write("\ninclude 'balance.conf'\n")
    # The superuser only with trust and only on loopback; everyone else by password.
    (datadir / "pg_hba.conf").write_text(
        "# written by python -m stack\n"
        "host all postgres 127.0.0.1/32 trust\n"
        # HAProxy's pgsql-check (infra/balance/haproxy.cfg) passes on any
        # authentication request but cannot answer SCRAM: it is asked for a
        # password it never sends, on a database of its user's name that does
        # not exist, so nothing can log in through this line. Postgres logs
        # nothing when a client leaves at the password prompt.
        "host balance_check balance_check 127.0.0.1/32 password\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )


def remove_stale_lock(datadir: Path) -> None:
    """Remove postmaster.pid when the postmaster it names is dead or a zombie.

    Postgres itself only asks `kill(pid, 0)`, which a zombie answers. Where the
    system's PID 1 does not reap orphans, a kill -9'd postmaster stays a zombie
    and would block every restart of its cluster.
    """
    lock = datadir / "postmaster.pid"
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        state = "gone"
    if state in ("gone", "Z"):
        lock.unlink(missing_ok=True)


def server_argv(bindir: Path, datadir: Path) -> list[str]:
    return [str(bindir / "postgres"), "-D", str(datadir)]


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def conninfo_value(value: str) -> str:
    """A value for a libpq conninfo string: quoted, with \\ and ' escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_file(name: str, **values: str) -> list[str]:
    """The statements of ``infra/postgres/<name>``, placeholders filled with SQL literals."""
    lines = (SQL_DIR / name).read_text().splitlines()
    body = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    body = string.Template(body).substitute({k: literal(v) for k, v in values.items()})
    # Our files hold no semicolons inside statements; each statement runs alone
    # because CREATE DATABASE / SUBSCRIPTION refuse an implicit transaction.
    return [s.strip() for s in body.split(";") if s.strip()]


async def connect(
    port: int, database: str = "postgres", timeout: float = 2.0
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=SUPERUSER,
        database=database,
        timeout=timeout,
        # The replica's database is read-only by default; the superuser's own
        # session is not, so bootstrap and seeding can write.
        server_settings={"default_transaction_read_only": "off"},
    )


async def execute_all(conn: asyncpg.Connection, statements: Sequence[str]) -> None:
    for statement in statements:
        await conn.execute(statement)
