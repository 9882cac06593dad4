"""The page at / in headless Chromium (Debian's, driven by Playwright): pick an image, send a prompt,
the answer streams in and the per-token expert view appears. Saves a screenshot to $MOEVLM_SCREENSHOT
(else the test's tmp dir). Without Chromium the test skips, but fails in CI (CI set)."""

import os
import shutil
import tempfile

import pytest
from serve_helpers import live_server, picture

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_the_page_streams_an_answer_and_shows_the_experts(checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    image = tmp_path / "picture.png"
    picture(3).resize((96, 96)).save(image)
    screenshot = os.environ.get("MOEVLM_SCREENSHOT") or str(tmp_path / "page.png")
    with live_server(checkpoint) as (url, engine), sync_playwright() as playwright, \
            tempfile.TemporaryDirectory() as profile:
        # A fresh profile folder: Playwright passes it as --user-data-dir.
        browser = playwright.chromium.launch_persistent_context(profile, executable_path=executable,
                                                                args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('model ')")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
            page.fill("#prompt", "what is it")
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=30_000)
            answer = page.text_content("#answer")
            tokens = page.locator("#experts .token")
            layers = len(engine.model.moe_layers)
            top_k = engine.config.model.decoder.moe.top_k
            assert answer and tokens.count() >= 1
            assert "".join(tokens.nth(i).locator(".text").text_content() for i in range(tokens.count())) == answer
            assert tokens.first.locator(".layer").count() == layers
            coloured = tokens.first.locator(".cell[style]").count()
            assert coloured == layers * top_k
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    assert os.path.getsize(screenshot) > 1000
