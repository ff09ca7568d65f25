"""The app in a real browser: Debian's Chromium driven by Playwright (no browser download)."""

import shutil
from pathlib import Path

import pytest

from tests.app_server import running_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", "--no-first-run",
]  # fmt: skip

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (see README)")


def test_upload_prompt_start_and_watch_the_video_arrive(image_file, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with running_app(tmp_path / "outputs", tmp_path / "app.log") as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(image_file))
        page.get_by_label("Prompt", exact=True).fill("a cat walks")
        page.get_by_role("button", name="Start Generation").click()
        progress = page.locator("#progress-text")
        expect(progress).to_contain_text("section", timeout=120_000)
        seen_progress = progress.inner_text()
        page.wait_for_function(
            "() => { const v = document.querySelector('video'); return v && v.currentSrc && v.readyState >= 1; }",
            timeout=180_000,
        )
        expect(progress).to_contain_text("done:", timeout=180_000)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert "section 1 of" in seen_progress or "preparing" in seen_progress
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert list((tmp_path / "outputs").glob("*.mp4"))
