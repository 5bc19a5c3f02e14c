"""What lb's routes and access log cost, with nginx doing the same beside it.

Part of `python -m bench http` (alone: `python -m bench http --only features`).
Each proxy runs as bench/http.py runs it (one worker, pinned with the upstreams
to one core, wrk on the other, 64 keep-alive connections, rounds alternating,
the median kept) three ways:

- plain: one route (lb's catch-all; nginx's `location /`);
- routed: 20 routes, six exact hosts and two wildcards, nine path prefixes and
  three regexes, and the request (``/bench/42``) matches the last regex, so
  every route is looked at: nginx's server blocks and locations the same;
- logged: the plain case with the access log on, buffered (lb's combined
  format to a file; nginx `access_log PATH combined buffer=32k flush=1s`).

The ratios that count are each proxy's routed and logged req/s to its own plain
one (issue targets for lb: routed at least 0.95, logged at least 0.9).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .http import Measure, measure_argv, median, upstreams
from .procs import NGINX_HEAD, free_port, machine, require, rotated

VARIANTS = ("plain", "routed", "logged")
PROXIES = ("nginx", "lb")
CONNECTIONS = 64
PATH = "/bench/42"  # matches the last regex only

HOSTS = tuple(f"svc{i}.example.com" for i in range(1, 7))
WILDCARDS = ("*.svc.example.com", "www.example.*")
PREFIXES = (
    "/api/v1/",
    "/api/v2/",
    "/static/",
    "/images/",
    "/admin/",
    "/login/",
    "/health/",
    "/metrics/",
    "/docs/",
)
REGEXES = (r"\.(png|jpg|gif)$", r"^/download/.*\.zip$", r"^/bench/[0-9]+$")

PROXY_SETTINGS = """
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_next_upstream error timeout;
"""


def nginx_conf(variant: str, work: Path, port: int, up1: int, up2: int) -> str:
    log = f"access_log {work}/nginx-access.log combined buffer=32k flush=1s;"
    servers = []
    if variant == "routed":
        # the hosts' own servers, as lb's host routes: not the request's
        for name in (*HOSTS, *WILDCARDS):
            servers.append(
                f"  server {{\n    listen 127.0.0.1:{port};\n    server_name {name};\n"
                f"    location / {{{PROXY_SETTINGS}    }}\n  }}"
            )
        locations = [f"    location {p} {{{PROXY_SETTINGS}    }}" for p in PREFIXES]
        locations += [f'    location ~ "{r}" {{{PROXY_SETTINGS}    }}' for r in REGEXES]
    else:
        locations = [f"    location / {{{PROXY_SETTINGS}    }}"]
    servers.append(
        f"  server {{\n    listen 127.0.0.1:{port} default_server backlog=4096;\n"
        + (f"    {log}\n" if variant == "logged" else "")
        + "\n".join(locations)
        + "\n  }"
    )
    head = NGINX_HEAD.format(dir=work, name="nginx", workers=1)
    upstream = (
        f"  upstream backends {{\n    server 127.0.0.1:{up1} max_fails=1 fail_timeout=10s;\n"
        f"    server 127.0.0.1:{up2} max_fails=1 fail_timeout=10s;\n    keepalive 64;\n  }}\n"
    )
    return head + upstream + "\n".join(servers) + "\n}\n"


def lb_toml(variant: str, work: Path, port: int, up1: int, up2: int) -> str:
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'admin = "127.0.0.1:{free_port()}"',
    ]
    if variant == "logged":
        lines.append(f'access_log = "{work}/lb-access.log"')
    lines += [
        '[health]\npath = "/health"',
        '[[pool]]\nname = "backends"',
        f'[[pool.server]]\nname = "up1"\naddress = "127.0.0.1:{up1}"',
        f'[[pool.server]]\nname = "up2"\naddress = "127.0.0.1:{up2}"',
    ]
    if variant == "routed":
        for i, host in enumerate((*HOSTS, *WILDCARDS)):
            lines.append(f'[[route]]\nname = "host-{i}"\nhost = "{host}"\npool = "backends"')
        for i, prefix in enumerate(PREFIXES):
            lines.append(
                f'[[route]]\nname = "prefix-{i}"\npath_prefix = "{prefix}"\npool = "backends"'
            )
        for i, regex in enumerate(REGEXES):
            lines.append(
                f'[[route]]\nname = "regex-{i}"\npath_regex = \'{regex}\'\npool = "backends"'
            )
    else:
        lines.append('[[route]]\nname = "all"\npool = "backends"')
    return "\n".join(lines) + "\n"


def argv(name: str, variant: str, work: Path, port: int, up1: int, up2: int) -> list[str]:
    if name == "nginx":
        conf = work / f"nginx-{variant}.conf"
        conf.write_text(nginx_conf(variant, work, port, up1, up2))
        return ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")]
    toml = work / f"lb-{variant}.toml"
    toml.write_text(lb_toml(variant, work, port, up1, up2))
    return [sys.executable, "-m", "lb", "--config", str(toml)]


def run_features(*, seconds: float, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    require("wrk", "taskset", "nginx")
    cases = [(p, v) for p in PROXIES for v in VARIANTS]
    labels = tuple(f"{p} {v}" for p, v in cases)
    rows: dict[str, list[Measure]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp)
        with upstreams(work) as (up1, up2):
            for r in range(1, rounds + 1):
                for label in rotated(labels, r):
                    proxy, variant = label.split()
                    say(f"round {r}/{rounds}: {label} ({seconds:g}s, {CONNECTIONS} connections)")
                    port = free_port()
                    command = argv(proxy, variant, work, port, up1, up2)
                    m = measure_argv(label, command, port, work, seconds, CONNECTIONS, path=PATH)
                    rows[label].append(m)
    medians = {label: median(ms) for label, ms in rows.items()}
    return {
        "benchmark": "http-features",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {
            "seconds": seconds,
            "rounds": rounds,
            "connections": CONNECTIONS,
            "path": PATH,
            "routes": len(HOSTS) + len(WILDCARDS) + len(PREFIXES) + len(REGEXES),
        },
        "proxies": {label: asdict(m) for label, m in medians.items()},
        "ratios_to_plain": {
            f"{p} {v}": round(medians[f"{p} {v}"].rps / medians[f"{p} plain"].rps, 3)
            for p, v in cases
            if v != "plain"
        },
        "rounds": {label: [asdict(m) for m in ms] for label, ms in rows.items()},
    }


def features_table(result: dict[str, Any]) -> str:
    ratios = result["ratios_to_plain"]
    lines = [
        "| proxy | case | req/s | p99 ms | CPU µs/req | errors | req/s vs its plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in result["proxies"].items():
        proxy, variant = label.split()
        ratio = f"{ratios[label]:.3f}" if label in ratios else "1"
        lines.append(
            f"| {proxy} | {variant} | {m['rps']:,.0f} | {m['p99_ms']:.2f} | "
            f"{m['cpu_us_per_request']:.1f} | {m['errors']} | {ratio} |"
        )
    return "\n".join(lines)
