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
                                                   "(make test installs it on Debian as root)"),
              pytest.mark.xdist_group("browser")]  # one streamlit server for the module (make test: --dist loadgroup)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """The server's run store (TRACE_STORE); empty unless a test puts a run in it (and takes it out again)."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(store_dir):
    port = free_port()
    env = dict(os.environ, TRACE_STORE=str(store_dir))
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
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
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


def test_html_in_token_texts_is_shown_as_text_and_never_runs(server, store_dir):
    """Robustness item 11: token texts, top-k texts, the prompt, the model name, a run label and an upload's file
    name carrying <script>, onerror=, javascript: links. They reach the page through a stored run (Runs -> Open,
    then Router and Logits) and through uploaded payloads (Diff); nothing may execute or become an element."""
    from playwright.sync_api import sync_playwright

    from engine.model import load_model
    from tests.workbench.hostile import IMG, INJECTED_JS, LABEL, SCRIPT, hostile_payload
    from traces.payload import dumps
    from traces.store import Run, Store
    from workbench.catalog import EMBEDDED_DIR

    url, _ = server
    payload = hostile_payload(load_model(EMBEDDED_DIR / "stdlib-coder-q8_0.gguf"))
    store = Store(store_dir)
    run_id = store.save(Run.from_payload(payload, label=LABEL))
    body = dumps(payload).encode()

    def inert(page, where: str, *texts: str) -> None:
        page.wait_for_timeout(1000)  # an <img onerror> fires after its load fails
        assert not page.locator("[data-testid='stException']").count(), f"{where}: exception on the page"
        assert page.evaluate(INJECTED_JS) == [], where
        shown = page.evaluate("() => document.body.textContent")
        for text in texts:
            assert text in shown, f"{where}: {text!r} is not shown as text"

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors, dialogs = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # a stored run: Runs -> Open, then the Router and Logits pages of the same session
            page.goto(f"{url}/runs", wait_until="domcontentloaded")
            page.wait_for_selector("[data-testid='stDataFrame']", timeout=240_000)
            page.get_by_role("button", name="Open in the workbench").click()
            page.get_by_text("Opened: the Router and Logits pages now show this run.").wait_for(timeout=60_000)
            inert(page, "runs")
            page.get_by_role("link", name="Router").click()
            page.wait_for_selector("[data-testid='stCaptionContainer']", timeout=120_000)
            page.wait_for_selector(CHART, timeout=120_000)
            box = page.locator(CHART).nth(2).bounding_box()  # the token x layer chart: hover shows token texts
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            inert(page, "router", SCRIPT, IMG)
            page.get_by_role("link", name="Logits").click()
            page.wait_for_selector(f"{CHART} .barlayer", timeout=120_000)
            inert(page, "logits", SCRIPT)
            # uploaded payloads on the Diff page, and an upload whose file name is HTML
            page.get_by_role("link", name="Diff").click()
            page.get_by_text("uploaded payloads").click()
            inputs = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            inputs.first.wait_for(state="attached", timeout=60_000)
            for i in range(2):  # one at a time: each upload reruns the page, and a busy machine can lose a
                inputs.nth(i).set_input_files(files=[{"name": f"p{i}.json", "mimeType": "application/json",  # race
                                                      "buffer": body}])
                page.get_by_text(f"p{i}.json").first.wait_for(timeout=60_000)
            page.get_by_text("No divergence").wait_for(timeout=120_000)
            page.wait_for_selector(f"{CHART} .barlayer", timeout=120_000)
            inert(page, "diff", SCRIPT)
            name = "<img src=x onerror=window.__pwned=7>.json"  # (a browser sends '"' in a file name as %22)
            inputs.first.set_input_files(files=[{"name": name, "mimeType": "application/json", "buffer": b"{nope"}])
            page.get_by_text("not JSON").wait_for(timeout=60_000)
            inert(page, "diff upload error", name)
            browser.close()
    finally:
        store.remove(run_id)
    assert not errors and not dialogs, (errors, dialogs)
