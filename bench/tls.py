"""`python -m bench tls`: lb's TLS listener against nginx's and HAProxy's, in one run.

Each proxy terminates TLS (1.2 and 1.3 allowed, as lb's default; wrk speaks
1.3) with the same ECDSA P-256 certificate (made for the run by stack/pki.py)
in one worker, pinned with the two upstreams to one core and wrk on the other,
as `bench http` does, and speaks plain HTTP to the upstreams. Three cases:

- keep-alive, 64 connections, 1 KiB responses: the cost of TLS records on top
  of the proxying (the crypto is OpenSSL's in all three);
- keep-alive, 64 connections, 64 KiB responses: bulk encryption;
- handshakes: a new TLS connection per request (``Connection: close``), 16 at
  a time: full handshakes a second (wrk does not resume sessions).

Rounds alternate between the proxies and the median round counts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stack.pki import Issued, authority

from . import http
from .http import Measure, measure_argv, median, upstreams
from .procs import NGINX_HEAD, free_port, machine, require, rotated

PROXIES = ("nginx", "haproxy", "lb")


@dataclass(frozen=True)
class Case:
    name: str
    size: int  # response body bytes
    connections: int
    headers: tuple[str, ...] = ()


CASES = (
    Case("keepalive-1k", 1024, 64),
    Case("keepalive-64k", 65536, 64),
    Case("handshakes", 1024, 16, ("Connection: close",)),
)

NGINX_CONF = (
    NGINX_HEAD
    + """  upstream backends {{
    server 127.0.0.1:{up1};
    server 127.0.0.1:{up2};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;  # as lb's min_version 1.2 (wrk speaks 1.3)
    ssl_session_cache shared:SSL:10m;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
    }}
  }}
}}
"""
)

# bench http's HAProxy, its frontend binding TLS (HAProxy's crt: the chain and key in one file)
HAPROXY_CFG = http.HAPROXY_CFG.replace(
    "  bind 127.0.0.1:{port}\n",
    "  bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1 ssl-min-ver TLSv1.2\n"
    "  http-request set-header X-Forwarded-Proto https\n",
)
assert HAPROXY_CFG != http.HAPROXY_CFG


def proxy_argv(name: str, work: Path, port: int, up1: int, up2: int, cert: Issued) -> list[str]:
    if name == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=work,
                name="nginx",
                workers=1,
                port=port,
                up1=up1,
                up2=up2,
                cert=cert.cert,
                key=cert.key,
            )
        )
        return ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")]
    if name == "haproxy":
        pem = work / "haproxy.pem"  # HAProxy's crt: the chain and the key in one file
        pem.write_bytes(cert.cert.read_bytes() + cert.key.read_bytes())
        cfg = work / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, up1=up1, up2=up2, pem=pem, workers=1))
        return ["haproxy", "-db", "-f", str(cfg)]
    if name == "lb":
        return [
            sys.executable,
            *("-m", "lb", "--listen", "off", "--tls-listen", f"127.0.0.1:{port}"),
            *("--tls-cert", str(cert.cert), "--tls-key", str(cert.key)),
            *("--server", f"up1=127.0.0.1:{up1}", "--server", f"up2=127.0.0.1:{up2}"),
            *("--admin", f"127.0.0.1:{free_port()}", "--health-path", "/health"),
        ]
    raise ValueError(name)


def run_tls(
    *,
    seconds: float,
    rounds: int,
    proxies: tuple[str, ...],
    say: Callable[[str], None],
    cases: tuple[str, ...] = (),
) -> dict[str, Any]:
    require("wrk", "taskset", *(p for p in proxies if p in ("nginx", "haproxy")))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        cert = authority(work / "ca").issue(work, "site", ["localhost", "127.0.0.1"])
        for case in CASES:
            if cases and case.name not in cases:
                continue
            rows: dict[str, list[Measure]] = {p: [] for p in proxies}
            with upstreams(work, size=case.size) as (up1, up2):
                for r in range(1, rounds + 1):
                    for name in rotated(proxies, r):
                        say(f"{case.name} round {r}/{rounds}: {name} ({seconds:g}s)")
                        port = free_port()
                        argv = proxy_argv(name, work, port, up1, up2, cert)
                        rows[name].append(
                            measure_argv(
                                name,
                                argv,
                                port,
                                work,
                                seconds,
                                case.connections,
                                scheme="https",
                                headers=case.headers,
                            )
                        )
            medians = {name: median(ms) for name, ms in rows.items()}
            base = medians.get("nginx")
            runs.append(
                {
                    "case": asdict(case),
                    "proxies": {name: asdict(m) for name, m in medians.items()},
                    "rounds": {name: [asdict(m) for m in ms] for name, ms in rows.items()},
                    "ratios_to_nginx": {}
                    if base is None
                    else {
                        name: {
                            "rps": round(m.rps / base.rps, 3),
                            "p99": round(m.p99_ms / base.p99_ms, 3),
                            "cpu_per_request": round(
                                m.cpu_us_per_request / base.cpu_us_per_request, 3
                            ),
                        }
                        for name, m in medians.items()
                    },
                }
            )
    return {
        "benchmark": "tls",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "settings": {"seconds": seconds, "rounds": rounds, "tls": "1.3", "key": "ECDSA P-256"},
        "runs": runs,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| case | proxy | req/s | p50 ms | p99 ms | CPU µs/req | errors | req/s vs nginx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for name, m in run["proxies"].items():
            ratio = run["ratios_to_nginx"].get(name, {}).get("rps", float("nan"))
            lines.append(
                f"| {run['case']['name']} | {name} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | "
                f"{m['p99_ms']:.2f} | {m['cpu_us_per_request']:.1f} | {m['errors']} | "
                f"{ratio:.2f} |"
            )
    return "\n".join(lines)
