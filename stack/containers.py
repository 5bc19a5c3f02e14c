"""docker-compose-balance.yml for real: an engine, the images, and the profile up or down.

    python -m stack.containers up --profile python|classic
    python -m stack.containers down
    python -m stack.containers images      (build what `up` needs, and stop)

With Docker it is `docker compose ... up --build` with the upstream images.
Where there is no Docker engine (this project's machines), Debian's podman
stands in for it (stack/engine.py) and the third-party images are stand-ins
built locally (stack/standins.py). Grafana has no Debian package: it is left
out there, and the dashboard's queries are checked against Prometheus instead
(tests/test_compose_run.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence

from .engine import (
    COMPOSE,
    PROJECT,
    Engine,
    Say,
    docker_engine,
    healthcheck_loop,
    podman_engine,
    podman_running,
    start_podman_service,
    stop_podman_service,
    why_no_engine,
)
from .errors import StackError
from .standins import build_images

PROFILES = ("python", "classic")
# Services of the compose file that no stand-in can run (no Debian package).
NO_STANDIN = ("grafana",)


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
    if engine.kind == "podman" and not podman_running():
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
