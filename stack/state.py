"""The state file: the topology of the running stack and the processes it started."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .processes import ProcessRef
from .topology import Topology

STATE_FILE = "state.json"


@dataclass
class StackState:
    topology: Topology
    processes: dict[str, ProcessRef] = field(default_factory=dict)

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / STATE_FILE

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        try:
            data = json.loads(cls.path(state_dir).read_text())
        except FileNotFoundError:
            return None
        return cls(
            topology=Topology.from_json(data["topology"]),
            processes={k: ProcessRef.from_json(v) for k, v in data["processes"].items()},
        )

    def save(self) -> None:
        path = self.path(self.topology.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "topology": self.topology.to_json(),
            "processes": {k: v.to_json() for k, v in self.processes.items()},
        }
        tmp = path.with_suffix(".tmp")
        # It holds the local stack's passwords: readable by us only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        tmp.replace(path)
