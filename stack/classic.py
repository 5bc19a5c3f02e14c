"""infra/balance's configs with local addresses: nginx.conf, haproxy.cfg and lb.toml.

The files are written for docker-compose-balance.yml (service names, container
ports, 0.0.0.0). The local stack changes only the addresses, so what runs here
is what runs in compose; an address the map does not know is an error, which
keeps the files, compose and the stack from drifting apart.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from .errors import StackError

# host:port as a whole word (not part of a longer name or number).
_ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*|\d+\.\d+\.\d+\.\d+):(\d{1,5})(?![\w.:-])")

# The compose address of each port of the stack, by Ports field.
COMPOSE_ADDRESSES: Mapping[str, str] = {
    "entry": "0.0.0.0:8080",
    "entry_tls": "0.0.0.0:8443",
    "lb_admin": "0.0.0.0:9101",
    "backend_1": "users-backend-1:8081",
    "backend_2": "users-backend-2:8082",
    "hello_1": "hello-1:8083",
    "hello_2": "hello-2:8084",
    "db_rw": "0.0.0.0:6432",
    "db_ro": "0.0.0.0:6433",
    "db_any": "0.0.0.0:6434",
    "dbproxy_admin": "0.0.0.0:9102",
    "master": "service-db:5432",
    "replica": "service-db-replica:5432",
    "prometheus": "0.0.0.0:9090",
    "nginx_exporter": "0.0.0.0:9113",
}


def compose_addresses_in(text: str) -> list[str]:
    """Every host:port the config uses, outside comments, in order."""
    found: list[str] = []
    for line in text.splitlines():
        found += [m.group(0) for m in _ADDRESS.finditer(line.partition("#")[0])]
    return found


def render(source: Path, addresses: Mapping[str, str]) -> str:
    """The file with each compose address replaced by its local one."""
    text = source.read_text()
    unknown = sorted(set(compose_addresses_in(text)) - set(addresses))
    if unknown:
        raise StackError(
            f"{source}: address(es) {', '.join(unknown)} are not part of the stack; "
            f"known: {', '.join(sorted(addresses))}"
        )

    def local(match: re.Match[str]) -> str:
        return addresses[match.group(0)]

    def local_line(line: str) -> str:
        code, sep, comment = line.partition("#")
        return _ADDRESS.sub(local, code) + sep + comment

    return "\n".join(local_line(line) for line in text.splitlines()) + "\n"


def find_program(name: str) -> str:
    # Debian puts nginx and haproxy in /usr/sbin, which a non-root PATH may lack.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise StackError(
            f"{name} is not installed; `make setup` installs it (Debian package "
            f"{'nginx-light' if name == 'nginx' else name}), or run `apt-get install {name}`"
        )
    return found
