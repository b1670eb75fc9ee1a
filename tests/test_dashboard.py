"""The live dashboard loads in headless Chromium, shows live figures, and is screenshotted.

Needs Debian's ``chromium`` package (``.ci/install-chromium.sh``); without it
the test skips, except in CI (CI=true) where a missing browser is a failure.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.test_api import ApiThread, payment

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get("CI") != "true":
    pytest.skip("headless chromium not installed (apt-get install chromium, or .ci/install-chromium.sh)",
                allow_module_level=True)


def chromium(args: list[str], profile: Path, timeout: float = 45) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "CI=true but chromium is missing: run .ci/install-chromium.sh"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars",
           # the API's certificate comes from the test's throw-away development CA
           "--ignore-certificate-errors", f"--user-data-dir={profile}", "--window-size=1280,900",
           # let the page's fetch/refresh cycle run before the DOM or pixels are taken
           "--virtual-time-budget=4000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


async def traffic(api, stop: threading.Event) -> int:
    """Payments at ~50/s through the API so the page has live figures to show."""
    n = 0
    async with api.session() as s:
        while not stop.is_set():
            async with s.post("/v1/payments", json=payment(amount=100 + n % 900),
                              headers={"Idempotency-Key": uuid.uuid4().hex}) as r:
                assert r.status == 201
            n += 1
            await asyncio.sleep(0.02)
    return n


def test_dashboard_renders_live_figures(tmp_path):
    stop = threading.Event()
    server = ApiThread(tmp_path)
    with server as api:
        fut = asyncio.run_coroutine_threadsafe(traffic(api, stop), server.loop)
        try:
            # two full seconds of traffic so "TPS (last second)" has a complete second
            time.sleep(2.2)
            url = f"{api.url}/dashboard#key={api.keys['admin']}"
            dom = chromium(["--dump-dom", url], tmp_path / "profile-dom")
            shot = tmp_path / "dashboard.png"
            png = chromium([f"--screenshot={shot}", url], tmp_path / "profile-shot")
        finally:
            stop.set()
            sent = fut.result(30)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>isoswitch dashboard</title>" in html
    # the acquirer table has a row per configured acquirer, with link state
    rows = re.findall(r"<tr><td>(acq-[ab])</td><td><span class=\"pill (up|down|draining)\">", html)
    assert sorted(r[0] for r in rows) == ["acq-a", "acq-b"], html[-3000:]
    assert all(r[1] == "up" for r in rows)
    # a TPS figure rendered from /v1/admin/stats (not the placeholder)
    m = re.search(r'<span id="tps">(\d+)</span>', html)
    assert m is not None, html[-3000:]
    assert sent > 20 and int(m.group(1)) > 0
    # recent transactions are masked
    from switch.messages import TEST_PAN, mask_pan
    assert mask_pan(TEST_PAN) in html and TEST_PAN not in html
    assert png.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, png.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # refresh the README's screenshot only when asked: a test run must not edit tracked files
    docs = ROOT / "docs"
    if os.environ.get("ISOSWITCH_UPDATE_DOCS") == "1" and docs.is_dir():
        shutil.copyfile(shot, docs / "dashboard.png")



def test_recent_rows_are_a_bounded_sample_at_high_rates():
    """Below RECENT_ROWS_PER_S every transaction gets a dashboard row; above it,
    rows stop for the rest of that second (a masked row per transaction at
    20,000 TPS cost the switch CPU for a table of 25 rows)."""
    from types import SimpleNamespace

    from switch import metrics as M
    from switch.messages import TEST_PAN

    flow = SimpleNamespace(on_transaction=None, on_recent=None, on_acquirer=None)
    m = M.Metrics()
    m.instrument(SimpleNamespace(flow=flow))
    rows = []
    m.live.add_recent = rows.append
    req = {"t": "0200", "2": TEST_PAN, "4": "000000001000", "49": "840"}
    ctx = SimpleNamespace(listener="terminals")
    for _ in range(3):
        flow.on_recent(req, ctx, "acq-a", "00", 0.001)
    assert len(rows) == 3 and rows[0]["masked_pan"] == TEST_PAN[:6] + "*" * 6 + TEST_PAN[-4:]
    for _ in range(5 * M.RECENT_ROWS_PER_S):
        flow.on_recent(req, ctx, "acq-a", "00", 0.001)
    # at most one second's quota, or two if the calls straddled a second boundary
    assert M.RECENT_ROWS_PER_S <= len(rows) <= 2 * M.RECENT_ROWS_PER_S


def test_approval_rate_and_recent_rows_count_every_approving_code():
    """1993 action codes 000-007 and 1987's 08/10/11/16 approve (in whole or in
    part) as 00 does: the dashboard's approval rate and its row colours said
    "declined" for a 1993 acquirer's 001 (honour with identification)."""
    from types import SimpleNamespace

    from switch import metrics as M

    flow = SimpleNamespace(on_transaction=None, on_recent=None, on_acquirer=None)
    m = M.Metrics()
    m.instrument(SimpleNamespace(flow=flow))
    rows = []
    m.live.add_recent = rows.append
    ctx = SimpleNamespace(listener="terminals")
    approving = ["00", "08", "10", "11", "16", "000", "001", "002", "003", "007"]
    declining = ["05", "51", "91", "96", "100", "116", "911", "008"]
    for rc in approving + declining:
        flow.on_transaction("1200" if len(rc) == 3 else "0200", "acq-a", rc, 0.01)
        flow.on_recent({"t": "0200"}, ctx, "acq-a", rc, 0.01)
    snap = m.live.snapshot()
    assert snap["window_count"] == len(approving) + len(declining)
    assert snap["approval_rate"] == round(len(approving) / (len(approving) + len(declining)), 4)
    assert [r["approved"] for r in rows] == [True] * len(approving) + [False] * len(declining)
