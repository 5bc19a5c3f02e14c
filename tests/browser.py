"""Pages as a person sees them: headless Chromium (Debian's, installed by `make
setup`) runs their scripts and hands back the DOM, or a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise AssertionError("chromium is not installed: `make setup` installs it")
    return found


def run(url: str, *args: str, wait_ms: int = 8000) -> str:
    """Chromium with ``args`` on ``url``, the page's scripts given ``wait_ms`` of
    (virtual) time: its timers run, its fetches go to the real server."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        out = subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={wait_ms}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    return out.stdout


def page_text(url: str) -> str:
    """The text of the page once its scripts ran, without its script and style."""
    dom = run(url, "--dump-dom")
    dom = re.sub(r"(?s)<(script|style)[^>]*>.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def screenshot(url: str, out: Path, size: str = "1400,800") -> None:
    run(url, f"--screenshot={out}", f"--window-size={size}")
