"""The UI in a real browser (Debian's Chromium driven by Python playwright) against the real
system on loopback: a prompt streams in several pieces, Stop cancels, the cluster view shows
every node healthy with its layers, and a SIGKILLed node shows as down within seconds.
Screenshots go to test-output/e2e/.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeserve.launcher.frontend import DIST
from pipeserve.launcher.procs import ProcessCluster, _http_ok
from tests.harness import cluster_config, free_port
from tests.paced_node import PACED_NODE

CHROMIUM = "/usr/bin/chromium"
OUT = Path("test-output/e2e")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
    ),
    pytest.mark.skipif(not (DIST / "index.html").exists(), reason="the UI is not built (make frontend)"),
]


API_KEY = "e2e-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    # with an API key: the UI server's proxy adds it; the browser never sees it
    cfg = cluster_config(
        "smollm2-135m-instruct",
        3,
        api={"port": free_port(), "api_key": API_KEY},
        frontend={"port": free_port()},
    )
    # paced nodes: a 400-token story takes >= 24 s, so it is still streaming when Stop is clicked
    pc = ProcessCluster(cfg, tmp_path_factory.mktemp("e2e"), with_api=True, node_module=PACED_NODE).start()
    ui = subprocess.Popen(
        [sys.executable, "-m", "pipeserve.cli", "frontend", "--config", str(pc.config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{cfg.frontend.port}/"
    deadline = time.monotonic() + 30
    while not _http_ok(url):
        assert time.monotonic() < deadline, "the UI server did not start"
        time.sleep(0.2)
    import httpx

    api = f"http://127.0.0.1:{cfg.api.port}/api/cluster"
    assert httpx.get(api, timeout=10).status_code == 401  # the API itself wants the key
    assert httpx.get(url + "api/cluster", timeout=10).status_code == 200  # the proxy adds it
    bundle = "".join(p.read_text(errors="replace") for p in DIST.rglob("*") if p.is_file())
    assert API_KEY not in bundle
    yield pc, url
    ui.terminate()
    ui.wait(10)
    pc.stop()


@pytest.fixture(scope="module")
def page(system):
    from playwright.sync_api import sync_playwright

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(system[1])
        yield pg
        browser.close()
        assert not errors, f"uncaught errors in the page: {errors}"


def test_prompt_streams_in_pieces(page):
    page.get_by_test_id("mode-chat").click()
    page.get_by_test_id("param-temperature").fill("0")
    page.get_by_test_id("prompt-input").fill("What is the capital of France?")
    # Every text the reply shows, recorded in the page as the DOM changes (polling from here
    # can miss the steps of a short, fast reply), with the time of the first one.
    page.evaluate(
        """() => {
          window.__seen = [];
          new MutationObserver(() => {
            const r = document.querySelector('[data-testid="reply"]');
            const t = r ? r.innerText : "";
            if (t && window.__seen[window.__seen.length - 1] !== t) {
              if (!window.__seen.length) window.__firstMs = performance.now();
              window.__seen.push(t);
            }
          }).observe(document.body, { subtree: true, childList: true, characterData: true });
        }"""
    )
    page.get_by_test_id("send-button").click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and page.get_by_test_id("finish-reason").count() == 0:
        time.sleep(0.05)
    page.screenshot(path=str(OUT / "chat.png"), full_page=True)
    assert page.get_by_test_id("finish-reason").count() == 1
    seen: list[str] = page.evaluate("window.__seen")
    first_token_ms = page.evaluate("window.__firstMs || 0")  # ms from navigation to the first token
    assert len(seen) >= 2, f"the reply arrived in one piece: {seen}"
    assert all(b.startswith(a.rstrip()) for a, b in itertools.pairwise(seen)), seen  # it only grows
    assert "Paris" in page.get_by_test_id("reply").inner_text()
    assert "0:node1" in page.get_by_test_id("reply-route").inner_text()
    (OUT / "timings.json").write_text(json.dumps({"page_load_to_first_token_ms": first_token_ms}))


def test_stop_cancels(page):
    page.get_by_test_id("param-maxTokens").fill("400")
    page.get_by_test_id("prompt-input").fill("Write a very long story about a dragon who learns to paint.")
    page.get_by_test_id("send-button").click()
    page.wait_for_function(
        "document.querySelector('[data-testid=reply]')?.innerText.length > 20", timeout=60000
    )
    page.get_by_test_id("stop-button").click()
    page.get_by_test_id("finish-reason").wait_for(timeout=10000)
    assert "cancel" in page.get_by_test_id("finish-reason").inner_text()
    page.screenshot(path=str(OUT / "stopped.png"), full_page=True)


def test_cluster_view_and_dead_node(page, system):
    pc, _ = system
    for n in ("node1", "node2", "node3"):
        card = page.get_by_test_id(f"node-card-{n}")
        card.wait_for(timeout=10000)
        assert card.get_attribute("data-healthy") == "true"
    assert "10" in page.get_by_test_id("node-card-node2").inner_text()  # layers [10, 20)
    page.screenshot(path=str(OUT / "cluster.png"), full_page=True)
    t0 = time.monotonic()
    pc.kill("node2")
    page.wait_for_selector("[data-testid=node-card-node2][data-healthy=false]", timeout=10000)
    down_after = time.monotonic() - t0
    page.screenshot(path=str(OUT / "node-down.png"), full_page=True)
    assert down_after < 5.0
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(OUT / "phone.png"), full_page=True)
