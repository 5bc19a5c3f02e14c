"""python -m stack itself: status, kill, start, down, and its errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stack import processes
from tests.stackctl import (
    StackHandle,
    port_args,
    port_is_free,
    random_ports,
    run_stack,
    running_stack,
)


def test_lifecycle(tmp_path: Path) -> None:
    with running_stack(tmp_path / "s", users=200) as stack:
        out = stack.cli("status").stdout
        services = ("service-db", "service-db-replica", "users-backend-1", "users-backend-2")
        for name in (*services, "prometheus"):
            assert name in out
        assert out.count("running") == 5

        refs = stack.refs()
        # kill: the whole postgres tree goes, as with docker kill
        replica_tree = processes.tree(refs["service-db-replica"])
        assert len(replica_tree) > 3, "postgres runs a postmaster and its workers"
        stack.kill("service-db-replica")
        assert not any(
            processes.is_alive(processes.ProcessRef(p, 0))
            or (
                Path(f"/proc/{p}").exists()
                and (Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z")
            )
            for p in replica_tree
        )
        assert "dead" in stack.cli("status").stdout
        again = stack.cli("kill", "service-db-replica", check=False)
        assert again.returncode == 1 and "is not running" in again.stderr

        stack.kill("users-backend-2")
        assert port_is_free(stack.ports.backend_2)
        stack.start("users-backend-2")
        stack.start("service-db-replica")
        assert stack.cli("status").stdout.count("running") == 5
        already = stack.cli("start", "users-backend-2", check=False)
        assert already.returncode == 1 and "already running" in already.stderr
        unknown = stack.cli("kill", "nginx-9", check=False)
        assert unknown.returncode == 1 and "unknown service" in unknown.stderr

        refs = stack.refs()
        trees = [pid for ref in refs.values() for pid in processes.tree(ref)]
        stack.cli("down")
        assert not any(processes.is_alive(ref) for ref in refs.values())
        for pid in trees:
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1].startswith("Z")
        for port in (
            stack.ports.master,
            stack.ports.replica,
            stack.ports.backend_1,
            stack.ports.backend_2,
        ):
            assert port_is_free(port), port
        assert "nothing was running" in stack.cli("down").stdout


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    ports = random_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.backend_2))
        taken.listen()
        result = run_stack(
            ["up", "--state-dir", str(tmp_path), "--users", "10", *port_args(ports)], check=False
        )
    assert result.returncode == 1
    assert f"port {ports.backend_2} for users-backend-2 is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert "nothing was running" in run_stack(["down", "--state-dir", str(tmp_path)]).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--port", "nonsense"], "expected NAME=PORT"),
        (["up", "--port", "backend-7=1234"], "unknown port name"),
        (["kill", "users-backend-1"], "no stack in"),
    ],
)
def test_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    command, *rest = args
    result = run_stack([command, "--state-dir", str(tmp_path), *rest], check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_up_twice_is_refused(stack: StackHandle) -> None:
    result = stack.cli("up", "--users", "10", check=False)
    assert result.returncode == 1
    assert "already up" in result.stderr
