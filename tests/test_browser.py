"""The app in a real browser: Debian's Chromium driven by Playwright (no browser download)."""

import shutil
import time
from pathlib import Path

import pytest

from tests.support.app_server import running_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", "--no-first-run",
]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.subprocess,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (see README)"),
]


def test_upload_prompt_start_watch_the_stages_and_end(image_file, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with running_app(tmp_path / "outputs", tmp_path / "app.log") as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app.url)
        expect(page.locator("#acceleration-status")).to_contain_text("tiny preset (random weights: expect noise)")
        page.locator("input[type=file]").first.set_input_files(str(image_file))
        page.get_by_label("Prompt", exact=True).fill("a cat walks")
        page.get_by_role("button", name="Start Generation").click()  # FramePack's default: 5 s, 4 sections
        progress = page.locator("#progress-text")
        expect(progress).to_contain_text("section 1 of 4 · sampling step", timeout=120_000)
        seen_sampling = progress.inner_text()
        expect(progress).to_contain_text("section 2 of 4", timeout=180_000)
        page.wait_for_function(
            "() => { const v = document.querySelector('video'); return v && v.currentSrc && v.readyState >= 1; }",
            timeout=180_000,
        )
        page.get_by_role("button", name="End Generation").click()
        expect(progress).to_contain_text("stopped after", timeout=180_000)
        final = progress.inner_text()
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert "section 1 of 4 · sampling step" in seen_sampling and "elapsed" in seen_sampling
    assert "stopped after 1 of 4 sections" in final or "stopped after 2 of 4 sections" in final
    assert "done" not in final
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert list((tmp_path / "outputs").glob("*.mp4"))


def test_closing_the_page_leaves_its_job_to_finish(image_file, tmp_path):
    """The queue outlives the page: the job of a closed page runs to its end (its video in the history)."""
    import json

    from playwright.sync_api import expect, sync_playwright

    outputs = tmp_path / "outputs"
    with running_app(outputs, tmp_path / "app.log") as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(app.url)
        page.locator("input[type=file]").first.set_input_files(str(image_file))
        page.get_by_label("Prompt", exact=True).fill("a cat walks")
        page.get_by_role("button", name="Start Generation").click()  # 5 s: 4 sections
        expect(page.locator("#progress-text")).to_contain_text("section 1 of 4 · sampling step", timeout=120_000)
        page.close()
        deadline = time.monotonic() + 300
        while not any(json.loads(p.read_text())["status"] != "running" for p in outputs.glob("*.json")):
            assert time.monotonic() < deadline, "the job of the closed page did not finish"
            time.sleep(0.2)
        browser.close()
    (record,) = [json.loads(path.read_text()) for path in outputs.glob("*.json")]
    assert record["status"] == "complete" and record["sections_done"] == 4


def test_load_settings_fills_the_page_and_number_of_videos_makes_that_many(image_file, tmp_path):
    """An earlier job's JSON, uploaded to Load settings, sets the prompt, seed and length on the page (and the start
    image); Number of videos 2 then makes two videos with the next seeds."""
    import json

    from playwright.sync_api import expect, sync_playwright

    import generate

    outputs = tmp_path / "outputs"
    code = generate.main(["--preset", "tiny", "--image", str(image_file), "--prompt", "a dog runs", "--seed", "5",
                          "--seconds", "1", "--steps", "1", "--output", str(outputs / "earlier.mp4")])  # fmt: skip
    assert code == 0
    with running_app(outputs, tmp_path / "app.log") as app, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(app.url)
        page.get_by_text("Load settings", exact=True).click()
        page.locator("#load-settings input[type=file]").set_input_files(str(outputs / "earlier.json"))
        progress = page.locator("#progress-text")
        expect(progress).to_contain_text("settings loaded from earlier.json", timeout=60_000)
        expect(page.get_by_label("Prompt", exact=True)).to_have_value("a dog runs")
        expect(page.get_by_label("Seed")).to_have_value("5")
        videos = page.get_by_label("number input for Number of videos")
        videos.fill("2")
        videos.press("Enter")
        page.get_by_role("button", name="Start Generation").click()
        expect(progress).to_contain_text("video 2 of 2 · done", timeout=300_000)
        browser.close()
    made = [json.loads(path.read_text()) for path in outputs.glob("*.json") if path.name != "earlier.json"]
    earlier = json.loads((outputs / "earlier.json").read_text())["settings"]
    assert sorted(record["settings"]["seed"] for record in made) == [5, 6]
    assert all(record["settings"] == {**earlier, "seed": record["settings"]["seed"]} for record in made)
