"""lb's status page in a real browser (headless Chromium): per server its state,
request rate and p99 of the last seconds, refreshed by the page itself.
(dbproxy's page, with its listeners: tests/test_dbproxy.py.)"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

from tests.browser import page_text, screenshot
from tests.lbctl import lb_with
from tests.lbload import keepalive_clients


def test_lbs_page_shows_each_server_with_its_rate_and_p99(tmp_path: Path) -> None:
    with lb_with(tmp_path) as (lb, upstreams):
        upstreams["b"].kill()  # one down, for the page to show it
        load = threading.Thread(target=lambda: asyncio.run(keepalive_clients(lb.port, 4, 12)))
        load.start()
        try:
            text = page_text(lb.admin + "/status.html")
            screenshot(lb.admin + "/status.html", tmp_path / "lb-status.png")
        finally:
            load.join()
    assert "hot path" in text and "one process" in text
    row_a = re.search(r" a 127\.0\.0\.1:\d+ UP .*?(?= b 127)", text)
    assert row_a, text
    assert re.search(r"[1-9][0-9.]* req/s", row_a.group()), row_a.group()  # it serves
    assert re.search(r"≤ [0-9.]+ (ms|s)", row_a.group()), row_a.group()  # its p99
    assert re.search(r" b 127\.0\.0\.1:\d+ DOWN ", text), text
    assert re.search(r"hedges after [0-9.]+ ms; \d+ of \d+ won", text), text  # the pool's hedging
    assert (tmp_path / "lb-status.png").stat().st_size > 10_000
