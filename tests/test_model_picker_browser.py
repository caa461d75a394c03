"""The Train tab's model picker in headless Chromium: the list this machine gets, the memory line beside it.

Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from app_server import running_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
STORED_MODEL = "Qwen/Qwen2.5-7B-Instruct"  # in tuner.memory.RECOMMENDED: planned without a download

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="the CPU's picker; a GPU lists more models")
def test_cpu_picker_offers_the_default_and_plans_a_typed_hub_model(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    with running_app(home, home / "app.log", env={"HF_HUB_OFFLINE": "1"}) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(srv.url)
        page.get_by_role("tab", name="2. Train").click()
        line = page.locator("#model-memory")
        expect(line).to_contain_text("No GPU here: the embedded SmolLM2-135M-Instruct trains on this CPU")
        picker = page.locator("#base-model input")
        picker.click()
        options = page.get_by_role("option")
        expect(options).to_have_count(1)  # a CPU gets the embedded default only
        expect(options.first).to_have_attribute("aria-label", "default")
        picker.press("Escape")

        # any Hub id can be typed: its memory on a GPU comes from the stored config, and offline says so
        picker.fill(STORED_MODEL)
        picker.press("Enter")
        expect(line).to_contain_text("Needs about", timeout=30_000)
        expect(line).to_contain_text("max_length 512, batch_size 8")
        expect(line).to_contain_text("offline (HF_HUB_OFFLINE=1)")
        first = line.inner_text()
        # the line follows the settings: a longer max length needs more
        length = page.get_by_label("Max length (tokens)")
        length.fill("2048")
        length.press("Tab")
        expect(line).to_contain_text("max_length 2048", timeout=30_000)
        assert float(line.inner_text().split("about ")[1].split(" GiB")[0]) > float(
            first.split("about ")[1].split(" GiB")[0])
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#base-model").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "train-model-picker.png"))
        browser.close()
