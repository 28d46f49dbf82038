"""The web page in a real headless browser (Debian's chromium driven by playwright's Python
package; playwright never downloads a browser here): it generates an image with streamed
step progress, captions an uploaded image, shows its kept-token overlay, and is not blank."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import API_KEY, data_url, image_message

CHROMIUM = Path(os.environ.get("LAVIT_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
# Records every text the status lines show (the progress stream passes through them).
RECORD_STATUS = """
window.__statuses = [];
new MutationObserver(() => {
  for (const id of ["gen-status", "ask-status", "tokens"]) {
    const el = document.getElementById(id);
    if (el && el.textContent) window.__statuses.push(id + ": " + el.textContent);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"no chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright's Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield launched
        launched.close()


@pytest.mark.slow
def test_the_page_generates_captions_and_shows_the_overlay(browser, server, input_png, tmp_path):
    from PIL import Image

    expected = server.request("POST", "/v1/chat/completions", body={"messages": image_message(
        data_url(input_png.read_bytes()))})[2]["choices"][0]["message"]["content"]
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
    page.add_init_script(RECORD_STATUS)
    page.goto(server.base_url + "/")
    assert page.title() == "LaVIT"

    # without the key the server's message is shown, as an error
    page.fill("#prompt", "a red car")
    page.click("#generate")
    page.wait_for_selector("#gen-status.error", timeout=30_000)
    assert "missing API key" in page.inner_text("#gen-status")

    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#size", "32x32")
    page.fill("#steps", "2")
    page.fill("#seed", "4")
    page.click("#generate")
    page.wait_for_selector("#result img.generated", timeout=120_000)
    size = page.evaluate("() => { const i = document.querySelector('#result img'); return [i.naturalWidth, i.naturalHeight]; }")
    assert size == [32, 32]
    assert "32x32, seed 4" in page.inner_text("#gen-status")
    statuses = page.evaluate("() => window.__statuses")
    # progress arrives step by step (several events read at once show only the last one)
    tokens = [s for s in statuses if s.startswith("gen-status: image tokens (LLM): ")]
    assert len(tokens) >= 3, statuses
    later = ("gen-status: VQ decoder", "gen-status: denoising (UNet)", "gen-status: VAE decode")
    assert any(s.startswith(later) for s in statuses), statuses

    page.set_input_files("#upload", str(input_png))
    page.wait_for_selector("#overlay:not([hidden])", timeout=60_000)
    assert "visual tokens kept of 256 patches" in page.inner_text("#tokens")
    page.click("#ask")
    page.wait_for_selector("#answer[data-done='1']", timeout=120_000)
    assert page.inner_text("#answer") == expected and expected
    assert "caption (" in page.inner_text("#ask-status") and "prompt tokens" in page.inner_text("#ask-status")
    assert not problems, problems

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    picture = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200, f"the screenshot has {len(colours)} colours: blank?"
    overlay = page.locator("#overlay").screenshot()
    assert len(Image.open(io.BytesIO(overlay)).convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100
    if os.environ.get("LAVIT_KEEP_SCREENSHOT"):
        Path(os.environ["LAVIT_KEEP_SCREENSHOT"]).write_bytes(shot.read_bytes())
    page.close()
