"""A real browser: start `streamlit run workbench/app.py` on a free loopback port, open it in headless
Debian Chromium driven by Playwright, wait for the chart on every page, keep the screenshots.

Screenshots go to test-artifacts/screenshots/; with UPDATE_SCREENSHOTS=1 also to docs/screenshots/
(the README's pictures come from there, produced by this test, never drawn by hand).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
CHART = ".js-plotly-plot"
PAGES = [("trace", "", CHART), ("router", "router", CHART), ("logits", "logits", CHART),
         ("generate", "generate", "[data-testid='stTextArea'] textarea"),
         ("diff", "diff", "[data-testid='stRadio']"), ("runs", "runs", "[data-testid='stAlert'], [data-testid='stDataFrame']")]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed "
                                                   "(make test installs it on Debian as root)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, TRACE_STORE=str(tmp_path_factory.mktemp("store")))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "workbench" / "app.py"),
                             "--server.port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not answer on " + url)
    yield url, port
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_server_listens_on_loopback_only(server):
    _, port = server
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if shutil.which("ss") else \
        Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
    if shutil.which("ss"):
        lines = [ln for ln in out.splitlines() if f":{port} " in ln]
        assert lines and all("127.0.0.1:" in ln for ln in lines), lines
    else:
        hexport = f":{port:04X} "
        lines = [ln for ln in out.splitlines() if hexport in ln and " 0A " in ln]
        assert lines and all("0100007F" + hexport in ln for ln in lines), lines


def test_every_page_renders_its_chart_in_chromium(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for name, path, ready in PAGES:
            page.goto(f"{url}/{path}", wait_until="domcontentloaded")
            page.wait_for_selector(ready, timeout=240_000)
            page.wait_for_timeout(1500)
            assert not page.locator("[data-testid='stException']").count(), f"{name}: exception on the page"
            shot = ARTIFACTS / f"{name}.png"
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 10_000
            if os.environ.get("UPDATE_SCREENSHOTS"):
                (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, ROOT / "docs" / "screenshots" / shot.name)
        # the landing page's std-growth chart drew real traces
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector(".js-plotly-plot .scatterlayer .trace", timeout=240_000)
        assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 6
        browser.close()
    assert not errors, errors
