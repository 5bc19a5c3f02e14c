"""docker-compose-balance.yml for real: an engine, the images, and the profile up or down.

    python -m stack.containers up --profile python|classic
    python -m stack.containers down
    python -m stack.containers images      (build what `up` needs, and stop)

With Docker it is `docker compose ... up --build` with the upstream images. Where
there is no Docker engine (this project's machines), Debian's podman stands in:
its Docker API socket for docker-compose, the `runc` runtime (`crun` refuses
hybrid cgroups), default ulimits within the process's hard limits, and a loop
that runs each container's healthcheck every 2 s (podman runs them from
systemd timers, and without systemd a container stays "starting" for ever).
No image registry can be reached there either, so the third-party images are
stand-ins built from a Debian base made with debootstrap and Debian's own
packages (infra/standins/), under names of their own (never an upstream one),
each rebuilt only when its recipe changes. Grafana has no Debian package: it
is left out there, and the dashboard's queries are checked against Prometheus
instead (tests/test_compose_run.py).

Everything podman needs lives in .compose/ (ignored by git): its configuration,
its socket, the PIDs of the service and of the healthcheck loop, their logs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import processes
from .errors import StackError

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose-balance.yml"
PROJECT = "balance"
WORK = REPO / ".compose"
STANDINS = REPO / "infra" / "standins"
PROFILES = ("python", "classic")
# Services of the compose file that no stand-in can run (no Debian package).
NO_STANDIN = ("grafana",)
HEALTHCHECK_EVERY = 2.0
PODMAN_NPROC = 32_768

# The stand-ins: the compose file's image variable, the recipe, and the local name.
BASE_IMAGE = "localhost/balance-standin/debian:bookworm"
STANDIN_IMAGES = {
    "BALANCE_POSTGRES_IMAGE": ("postgres", "localhost/balance-standin/postgres:15"),
    "BALANCE_NGINX_IMAGE": ("nginx", "localhost/balance-standin/nginx:1.22"),
    "BALANCE_HAPROXY_IMAGE": ("haproxy", "localhost/balance-standin/haproxy:2.6"),
    "BALANCE_PROMETHEUS_IMAGE": ("prometheus", "localhost/balance-standin/prometheus:2.42"),
    "BALANCE_NGINX_EXPORTER_IMAGE": (
        "nginx-exporter",
        "localhost/balance-standin/nginx-exporter:0.11",
    ),
}
PYTHON_STANDIN = "localhost/balance-standin/python:3.11"
APP_IMAGE = "localhost/balance:latest"
RECIPE_LABEL = "balance.recipe"

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
            else [_need("docker-compose")]
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


def _need(program: str) -> str:
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
        "# written by stack/containers.py: podman as this machine can run it\n"
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


# -- images -------------------------------------------------------------------------------


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _label(engine: Engine, image: str) -> str | None:
    result = engine.run(
        "image",
        "inspect",
        "--format",
        f'{{{{index .Labels "{RECIPE_LABEL}"}}}}',
        image,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _apt_sources() -> bytes:
    """The host's Debian sources: the stand-ins get the very packages the host has."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return b"".join(
        p.read_bytes() for p in paths if p.is_file() and p.suffix in (".list", ".sources")
    )


def build_base(engine: Engine, say: Say) -> str:
    """A minimal Debian bookworm image made with debootstrap, with the host's apt
    sources and CA bundle (pip in a build needs it): the stand-ins' base."""
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    recipe = _digest(b"base 2", _apt_sources(), ca.read_bytes() if ca.exists() else b"")
    if _label(engine, BASE_IMAGE) == recipe:
        return recipe
    _need("debootstrap")
    say("making a Debian base image with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="balance-rootfs-", dir=WORK) as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=ca-certificates",
                "bookworm",
                str(root),
                "http://deb.debian.org/debian",
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        for source in Path("/etc/apt/sources.list.d").glob("*.sources"):
            shutil.copy(source, root / "etc/apt/sources.list.d" / source.name)
        if ca.exists():
            shutil.copy(ca, root / "etc/ssl/host-ca.crt")
        tar = Path(tmp) / "root.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        engine.run(
            "import",
            "--change",
            f"LABEL {RECIPE_LABEL}={recipe}",
            "--change",
            "ENV PIP_CERT=/etc/ssl/host-ca.crt",
            "--change",
            "ENV DEBIAN_FRONTEND=noninteractive",
            "--change",
            'CMD ["bash"]',
            str(tar),
            BASE_IMAGE,
            timeout=600,
        )
    return recipe


def _build(engine: Engine, name: str, image: str, base: str, say: Say) -> None:
    recipe_file = STANDINS / f"{name}.Containerfile"
    extra = [p.read_bytes() for p in sorted(STANDINS.glob(f"{name}-*"))]
    recipe = _digest(base.encode(), recipe_file.read_bytes(), *extra)
    if _label(engine, image) == recipe:
        return
    say(f"building the stand-in {image}")
    engine.run(
        "build",
        "--network=host",
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--label",
        f"{RECIPE_LABEL}={recipe}",
        "-f",
        str(recipe_file),
        "-t",
        image,
        str(STANDINS),
        timeout=1200,
    )


def build_images(engine: Engine, say: Say) -> dict[str, str]:
    """Every image `up` needs, built where it is missing or stale; the compose
    file's image variables that name the stand-ins."""
    base = build_base(engine, say)
    for name, image in STANDIN_IMAGES.values():
        _build(engine, name, image, base, say)
    _build(engine, "python", PYTHON_STANDIN, base, say)
    say(f"building {APP_IMAGE} (infra/Dockerfile; layers cached)")
    engine.run(
        "build",
        "--network=host",
        "--build-arg",
        f"PYTHON_IMAGE={PYTHON_STANDIN}",
        "--build-arg",
        f"PYTHON_SLIM_IMAGE={PYTHON_STANDIN}",
        "-f",
        "infra/Dockerfile",
        "-t",
        APP_IMAGE,
        ".",
        timeout=1800,
    )
    return {variable: image for variable, (_, image) in STANDIN_IMAGES.items()}


# -- up and down ----------------------------------------------------------------------------


def engine_for_compose(say: Say) -> Engine:
    """The Docker engine, or podman set up to stand in for it, with its images built."""
    engine = docker_engine()
    if engine is not None:
        return engine
    reason = why_no_engine()
    if reason is not None:
        raise StackError(reason)
    engine = podman_engine()
    start_podman_service(engine, say)
    engine.env.update(build_images(engine, say))
    return engine


def services(engine: Engine, profile: str) -> list[str]:
    """The services `up` starts for ``profile``: those of no profile and those of
    this one (as `compose --profile` does), but those no stand-in can run."""
    import yaml  # a dev dependency: only the compose runner reads the file

    data = yaml.safe_load(COMPOSE.read_text())
    wanted = [
        name
        for name, service in data["services"].items()
        if profile in service.get("profiles", [profile])
    ]
    if engine.kind == "podman":
        wanted = [s for s in wanted if s not in NO_STANDIN]
    return wanted


def up(profile: str, say: Say = print, timeout: float = 180.0) -> Engine:
    """Bring ``profile`` up and wait until every service with a healthcheck is healthy."""
    engine = engine_for_compose(say)
    names = services(engine, profile)
    say(f"compose up --profile {profile}: {', '.join(names)}")
    build = ["--build"] if engine.kind == "docker" else ["--no-build"]
    engine.compose(profile, "up", "-d", *build, *names, timeout=900)
    wait_healthy(engine, profile, timeout)
    return engine


def containers(engine: Engine) -> dict[str, str]:
    """The project's containers: service name -> container id."""
    listed = engine.run(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--format",
        '{{.ID}} {{index .Labels "com.docker.compose.service"}}',
    )
    pairs = [line.split() for line in listed.stdout.splitlines() if line.strip()]
    return {service: cid for cid, service in pairs}


# Services that run once and end (their end is their success): the TLS material.
ONE_SHOT = frozenset({"tls-init"})


def health(engine: Engine, container: str) -> str:
    """'healthy', 'starting', 'unhealthy', or 'none' (no healthcheck); 'exited' when
    not running, 'done' when it ended with status 0."""
    result = engine.run(
        "inspect",
        "--format",
        "{{.State.Running}} {{.State.ExitCode}} "
        "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
        container,
        check=False,
    )
    running, code, status = [*result.stdout.strip().split(" ", 2), "", ""][:3]
    if running == "true":
        return status
    return "done" if code == "0" else "exited"


def wait_healthy(engine: Engine, profile: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {s: health(engine, c) for s, c in containers(engine).items()}
        waiting = {
            s: st
            for s, st in states.items()
            if st not in ("healthy", "none", "") and not (s in ONE_SHOT and st == "done")
        }
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"compose --profile {profile}: not healthy after {timeout:g}s: {waiting}"
            )
        time.sleep(1)


def down(say: Say = print) -> None:
    """Take the project down (containers, its network, its volumes), whatever the
    profile, and stop podman's service and the healthcheck loop."""
    engine = docker_engine() or (podman_engine() if shutil.which("podman") else None)
    if engine is None:
        return
    if engine.kind == "podman" and "service" not in _state():
        start_podman_service(engine, lambda _: None)  # compose talks to its API
    for profile in PROFILES:
        engine.compose(profile, "down", "-v", "--remove-orphans", "--timeout", "10", check=False)
    if engine.kind == "podman":
        stop_podman_service()
    say("compose: down")


def leftovers(engine: Engine) -> dict[str, list[str]]:
    """Containers, networks and volumes of the project that still exist."""
    label = f"label=com.docker.compose.project={PROJECT}"
    found = {
        "containers": engine.run("ps", "-aq", "--filter", label).stdout.split(),
        "networks": engine.run("network", "ls", "-q", "--filter", label).stdout.split(),
        "volumes": engine.run("volume", "ls", "-q", "--filter", label).stdout.split(),
    }
    return {k: v for k, v in found.items() if v}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stack.containers", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="bring a profile up, healthy")
    up_p.add_argument("--profile", choices=PROFILES, default="python")
    sub.add_parser("down", help="take the project down, and podman's service with it")
    sub.add_parser("images", help="build the images `up` needs")
    sub.add_parser("healthchecks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            up(args.profile)
            print(f"up: the {args.profile} profile; http://127.0.0.1:8080, Prometheus :9090")
        elif args.command == "down":
            down()
        elif args.command == "images":
            engine_for_compose(print)
        else:
            healthcheck_loop(podman_engine())
    except StackError as exc:
        print(f"stack.containers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
