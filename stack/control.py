"""The stack's operations: up, down, status, kill, start, freeze, thaw."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import postgres, processes, seed
from .errors import StackError
from .readiness import ensure_port_free, wait_ready
from .state import StackState
from .topology import MASTER, REPLICA, Topology

Say = Callable[[str], None]


def pg_root_for(state_dir: Path) -> Path:
    """Where the clusters' data lives: under the state dir when the postgres user can reach it.

    When we run as root and the checkout sits below a directory the postgres user
    cannot enter, the data goes to a directory of its own under the system temp dir.
    """
    user = postgres.run_as()
    preferred = state_dir / "pg"
    if postgres.reachable_by(state_dir.resolve(), user):
        return preferred
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"balance-stack-{digest}"


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    address: str
    pid: int | None
    state: str  # running | frozen | dead | not started


def _live(state: StackState) -> list[str]:
    return [n for n, ref in state.processes.items() if processes.is_alive(ref)]


async def _start(state: StackState, name: str) -> None:
    spec = state.topology.spec(name)
    for port in spec.listens:
        ensure_port_free(port, name)
    if spec.before_start is not None:
        spec.before_start()
    ref = processes.spawn(spec.argv, log_path=spec.log, env=spec.env, user=spec.user)
    # Recorded before the wait, so that `down` finds it even if start-up fails.
    state.processes[name] = ref
    state.save()
    await wait_ready(spec, ref)


async def _bootstrap(topology: Topology, say: Say) -> None:
    creds = topology.credentials
    roles = postgres.sql_file(
        "roles.sql",
        app_password=creds.app_password,
        check_password=creds.check_password,
        replication_password=creds.replication_password,
    )
    schema = postgres.sql_file("schema.sql") + postgres.sql_file("grants.sql")
    for name, port in ((MASTER, topology.ports.master), (REPLICA, topology.ports.replica)):
        conn = await postgres.connect(port)
        try:
            await postgres.execute_all(conn, [*roles, f"CREATE DATABASE {postgres.DATABASE}"])
        finally:
            await conn.close()
        conn = await postgres.connect(port, postgres.DATABASE)
        try:
            await postgres.execute_all(conn, schema)
            if name == MASTER:
                await postgres.execute_all(conn, postgres.sql_file("publication.sql"))
        finally:
            await conn.close()

    master = await postgres.connect(topology.ports.master, postgres.DATABASE)
    replica = await postgres.connect(topology.ports.replica, postgres.DATABASE)
    try:
        say(f"seeding {topology.users:,} users on {MASTER} (seed {topology.seed})")
        await seed.load_users(master, topology.users, topology.seed)
        publisher = (
            f"host=127.0.0.1 port={topology.ports.master} dbname={postgres.DATABASE} "
            f"user=replicator password={postgres.conninfo_value(creds.replication_password)}"
        )
        await postgres.execute_all(
            replica, postgres.sql_file("subscription.sql", publisher=publisher)
        )
        count = await seed.wait_for_replica(master, replica, timeout=300)
        say(f"{REPLICA} has all {count:,} users")
    finally:
        await master.close()
        await replica.close()


async def up(topology: Topology, say: Say) -> StackState:
    existing = StackState.load(topology.state_dir)
    if existing is not None and _live(existing):
        raise StackError(
            f"the stack in {topology.state_dir} is already up ({', '.join(_live(existing))}); "
            "run `python -m stack down` first"
        )
    for name in topology.services():
        for port in topology.spec(name).listens:
            ensure_port_free(port, name)

    state = StackState(topology)
    state.save()
    try:
        bindir = postgres.find_bindir()
        user = postgres.run_as()
        say(f"initdb {MASTER} and {REPLICA} in {topology.pg_root}")
        await asyncio.gather(
            *(
                asyncio.to_thread(postgres.initdb, bindir, topology.datadir(n), user)
                for n in (MASTER, REPLICA)
            )
        )
        postgres.configure(topology.datadir(MASTER), topology.ports.master, publisher=True)
        postgres.configure(topology.datadir(REPLICA), topology.ports.replica, publisher=False)
        await asyncio.gather(_start(state, MASTER), _start(state, REPLICA))
        await _bootstrap(topology, say)
        # Tier by tier, each ready before the next: a proxy started before its
        # servers would count them failed (nginx then leaves them out for
        # fail_timeout), as compose's depends_on conditions also prevent.
        for tier in topology.tiers()[1:]:
            await asyncio.gather(*(_start(state, n) for n in tier))
    except BaseException:
        say("start-up failed; stopping what was started")
        down(topology.state_dir, say=lambda _: None)
        raise
    return state


def status(state_dir: Path) -> list[ServiceStatus]:
    state = StackState.load(state_dir)
    if state is None:
        return []
    result = []
    for name in state.topology.services():
        ref = state.processes.get(name)
        if ref is None:
            condition = "not started"
        elif processes.is_frozen(ref):
            condition = "frozen"
        else:
            condition = "running" if processes.is_alive(ref) else "dead"
        result.append(
            ServiceStatus(
                name, state.topology.spec(name).address, ref.pid if ref else None, condition
            )
        )
    return result


def _require(state_dir: Path) -> StackState:
    state = StackState.load(state_dir)
    if state is None:
        raise StackError(f"no stack in {state_dir}; start one with `python -m stack up`")
    return state


def kill(state_dir: Path, name: str) -> int:
    """SIGKILL the service and every process it started; its PID."""
    ref = _running(state_dir, name)
    processes.kill_tree(ref)
    return ref.pid


def freeze(state_dir: Path, name: str) -> int:
    """SIGSTOP the service and every process it started (`docker pause`); its PID."""
    ref = _running(state_dir, name)
    processes.freeze_tree(ref)
    return ref.pid


def thaw(state_dir: Path, name: str) -> int:
    """SIGCONT a frozen service (`docker unpause`); its PID."""
    ref = _running(state_dir, name)
    processes.thaw_tree(ref)
    return ref.pid


def _running(state_dir: Path, name: str) -> processes.ProcessRef:
    state = _require(state_dir)
    state.topology.spec(name)  # an unknown name fails here with the list of names
    ref = state.processes.get(name)
    if ref is None or not processes.is_alive(ref):
        raise StackError(f"{name} is not running")
    return ref


async def start(state_dir: Path, name: str) -> int:
    """Start one stopped or killed service again, with the same settings; its PID."""
    state = _require(state_dir)
    state.topology.spec(name)
    ref = state.processes.get(name)
    if ref is not None and processes.is_alive(ref):
        raise StackError(f"{name} is already running (pid {ref.pid})")
    await _start(state, name)
    return state.processes[name].pid


def down(state_dir: Path, say: Say, *, purge: bool = False) -> int:
    """Stop every service, newest first; how many were running.

    With ``purge`` the clusters' data is removed too (the next `up` makes new ones anyway).
    """
    state = StackState.load(state_dir)
    if state is None:
        return 0
    stopped = 0
    for name in reversed(list(state.processes)):
        ref = state.processes[name]
        if not processes.is_alive(ref):
            continue
        spec = state.topology.spec(name)
        clean = processes.stop(ref, spec.stop_signal, timeout=15.0)
        say(f"stopped {name} (pid {ref.pid}){'' if clean else ', killed after the timeout'}")
        stopped += 1
    state.processes.clear()
    state.save()
    if purge:
        shutil.rmtree(state.topology.pg_root, ignore_errors=True)
    return stopped
