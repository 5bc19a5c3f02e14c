"""A container engine for docker-compose-balance.yml: Docker where there is one,
else Debian's podman set up to stand in for it.

podman stands in through its Docker API socket for docker-compose, the `runc`
runtime (`crun` refuses hybrid cgroups), default ulimits within the process's
hard limits, and a loop that runs each container's healthcheck every 2 s
(podman runs them from systemd timers, and without systemd a container stays
"starting" for ever). Everything it needs lives in .compose/ (ignored by git):
its configuration, its socket, the PIDs of the service and of the healthcheck
loop, their logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import processes
from .errors import StackError

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose-balance.yml"
PROJECT = "balance"
WORK = REPO / ".compose"
HEALTHCHECK_EVERY = 2.0
PODMAN_NPROC = 32_768

Say = Callable[[str], None]


@dataclass
class Engine:
    """How to reach a container engine: its CLI, a compose command and their environment."""

    kind: str  # "docker" or "podman"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cli(self) -> list[str]:
        return [self.kind]

    def run(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """The engine's CLI with ``args``; a StackError with its stderr when it fails."""
        return self._run([*self.cli, *args], check, timeout)

    def compose(
        self, profile: str, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Compose on the project's file and ``profile`` with ``args``."""
        tool = (
            ["docker", "compose"]
            if self.kind == "docker" and _has_compose_plugin()
            else [need("docker-compose")]
        )
        argv = [*tool, "-f", str(COMPOSE), "-p", PROJECT, "--profile", profile, *args]
        return self._run(argv, check, timeout)

    def _run(
        self, argv: list[str], check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            shown = " ".join(argv[:6])
            raise StackError(f"`{shown} ...` failed:\n{result.stderr.strip()[-3000:]}")
        return result


def need(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise StackError(f"{program} is missing: `make setup` installs it")
    return found


def _has_compose_plugin() -> bool:
    result = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return result.returncode == 0


def docker_engine() -> Engine | None:
    """A real Docker engine, when one answers (podman's docker shim does not count)."""
    if shutil.which("docker") is None:
        return None
    result = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0 or "podman" in result.stdout.lower():
        return None
    return Engine("docker")


def why_no_engine() -> str | None:
    """None when compose can run here; else why not, for a person (and a test's skip)."""
    if docker_engine() is not None:
        return None
    missing = [
        p for p in ("podman", "runc", "debootstrap", "docker-compose") if not shutil.which(p)
    ]
    if missing:
        return f"no Docker engine, and {', '.join(missing)} missing (`make setup` installs them)"
    if os.geteuid() != 0:
        return "no Docker engine, and podman's stand-in images need root (debootstrap)"
    return None


# -- podman, set up as an engine for docker-compose ------------------------------------


def podman_engine() -> Engine:
    WORK.mkdir(exist_ok=True)
    conf = WORK / "containers.conf"
    # podman asks runc for 1,048,576 of each, above the hard limits here (no
    # CAP_SYS_RESOURCE): ask for what the engine's own processes may have. Its
    # processes hold at most 32,768 processes whatever the shell's limit
    # (measured: runc refused 32,769 with the shell's hard limit at 96,367).
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    procs = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], PODMAN_NPROC)
    limit = [f"nofile={files}:{files}", f"nproc={procs}:{procs}"]
    conf.write_text(
        "# written by stack/engine.py: podman as this machine can run it\n"
        "[containers]\n"
        f"default_ulimits = {json.dumps(limit)}\n"
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    sock = WORK / "podman.sock"
    return Engine("podman", {"CONTAINERS_CONF": str(conf), "DOCKER_HOST": f"unix://{sock}"})


def _state() -> dict[str, processes.ProcessRef]:
    path = WORK / "state.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: processes.ProcessRef.from_json(v) for k, v in data.items()}


def _save_state(state: dict[str, processes.ProcessRef]) -> None:
    (WORK / "state.json").write_text(json.dumps({k: v.to_json() for k, v in state.items()}))


def start_podman_service(engine: Engine, say: Say) -> None:
    """podman's Docker API on .compose/podman.sock, and the healthcheck loop; both
    kept across calls while they live (their PIDs in .compose/state.json)."""
    state = {k: v for k, v in _state().items() if processes.is_alive(v)}
    env = {**os.environ, **engine.env}
    sock = WORK / "podman.sock"
    if "service" not in state:
        sock.unlink(missing_ok=True)
        say("starting podman's Docker API service")
        state["service"] = processes.spawn(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            log_path=WORK / "podman-service.log",
            env=env,
        )
        _wait_socket(sock)
    if "healthchecks" not in state:
        state["healthchecks"] = processes.spawn(
            [sys.executable, "-m", "stack.containers", "healthchecks"],
            log_path=WORK / "healthchecks.log",
            env=env,
            cwd=REPO,
        )
    _save_state(state)


def _wait_socket(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        time.sleep(0.1)
    raise StackError(f"podman's API did not come up on {path} (see .compose/podman-service.log)")


def podman_running() -> bool:
    """Whether this project's podman API service was started (and recorded)."""
    return "service" in _state()


def stop_podman_service() -> None:
    for ref in _state().values():
        processes.stop(ref, 15, timeout=10)
    (WORK / "state.json").unlink(missing_ok=True)


def healthcheck_loop(engine: Engine) -> None:
    """Run the healthcheck of every running container of the project, every 2 s."""
    while True:
        listed = engine.run(
            "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}", check=False
        )
        for container in listed.stdout.split():
            engine.run("healthcheck", "run", container, check=False, timeout=30)
        time.sleep(HEALTHCHECK_EVERY)
