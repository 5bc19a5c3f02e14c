"""A screenshot of a running proxy's status page, as a browser shows it.

    .venv/bin/python scripts/status_screenshot.py http://127.0.0.1:9101/status.html lb.png

(after `make demo`: lb's admin is on 9101, dbproxy's on 9102.) Uses headless
Chromium, which `make setup` installs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser import screenshot


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/status_screenshot.py")
    p.add_argument("url", help="a status page, e.g. http://127.0.0.1:9101/status.html")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--size", default="1400,800", help="window size, WIDTH,HEIGHT")
    args = p.parse_args()
    screenshot(args.url, args.out.resolve(), args.size)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
