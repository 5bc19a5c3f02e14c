"""The local stack's Prometheus: infra/prometheus/prometheus.yml with its targets
made local addresses, so `python -m stack up` is scraped as the compose file's
stack is (Debian's prometheus; and, for the classic profile, Debian's
prometheus-nginx-exporter standing in for the exporter nginx lacks).

A target of the compose file (a `host:port`, or a DNS name with a port) becomes
the local address of the same service when the profile runs it, and nothing
when it does not, as DNS finds no such container there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import StackError

SOURCE = Path(__file__).resolve().parent.parent / "infra" / "prometheus" / "prometheus.yml"


def local_config(targets: Mapping[str, str | None], source: Path = SOURCE) -> str:
    """The scrape configuration with each compose target replaced by ``targets``'
    local address for it (None: the profile does not run it); written as JSON,
    which is YAML too. A target the map does not know is an error, which keeps
    the file and the stack from drifting apart."""
    try:
        import yaml  # installed with the project's dev dependencies (`make setup`)
    except ImportError as exc:
        raise StackError("PyYAML is missing: `make setup` installs it") from exc
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    jobs = []
    for job in config["scrape_configs"]:
        compose_targets = [t for s in job.get("static_configs", []) for t in s["targets"]]
        compose_targets += [
            f"{name}:{d['port']}" for d in job.get("dns_sd_configs", []) for name in d["names"]
        ]
        unknown = [t for t in compose_targets if t not in targets]
        if unknown:
            raise StackError(f"{source}: target(s) {', '.join(unknown)} are not part of the stack")
        local = [address for t in compose_targets if (address := targets[t]) is not None]
        jobs.append(
            {
                "job_name": job["job_name"],
                **{k: v for k, v in job.items() if k not in _TARGETS and k != "job_name"},
                "static_configs": [{"targets": local}],
            }
        )
    return json.dumps({**config, "scrape_configs": jobs}, indent=2) + "\n"


_TARGETS = ("static_configs", "dns_sd_configs")
