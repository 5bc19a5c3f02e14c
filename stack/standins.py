"""The images docker-compose-balance.yml runs where no registry can be reached:
stand-ins for the third-party ones built from a Debian base made with
debootstrap and Debian's own packages (infra/standins/), under names of their
own (never an upstream one), each rebuilt only when its recipe changes; and the
project's own image (infra/Dockerfile) on the Python stand-in.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from .engine import REPO, WORK, Engine, Say, need

STANDINS = REPO / "infra" / "standins"

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
    need("debootstrap")
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
