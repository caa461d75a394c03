"""The Evaluate view in the real page (headless Chromium) on the shared trained run: three ways answer the same
held-out questions, and the page says which to ship in the evaluation's own sentence, above each way's numbers.

Screenshots go to the test's tmp dir and to /work/notes/shots/ (when that folder can be made) to look at."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from app_server import running_app

from tuner.evaluate import saved_result

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/work/notes/shots")
EVAL_TIMEOUT_MS = 300_000
MAX_NEW_TOKENS = 24
PROMPTS = 3

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, signoff_run):
    home = Path(os.environ["TUNER_HOME"])
    log = tmp_path_factory.mktemp("eval_browser") / "app.log"
    with running_app(home, log, env={"GRADIO_IS_E2E_TEST": "1"}) as srv:
        yield srv


def shot(page, tmp_path: Path, name: str, elem_id: str | None = None) -> None:
    path = tmp_path / f"{name}.png"
    if elem_id:
        page.locator(f"#{elem_id}").screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=True)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
    except OSError:  # another machine without the notes folder: the tmp copy is enough
        pass


def test_the_evaluate_view_compares_three_ways_and_says_which_to_ship(server, signoff_run, tmp_path):
    from playwright.sync_api import sync_playwright

    run_id = signoff_run.name
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.get_by_role("tab", name="3. Playground").click()
        page.wait_for_function("() => document.querySelector('#pg-run input')?.value", timeout=30_000)
        run_box = page.locator("#pg-run input")
        if run_box.input_value() != run_id:
            run_box.click()
            page.get_by_role("option", name=run_id, exact=True).click()
        page.wait_for_function(f"() => document.querySelector('#pg-run input')?.value === '{run_id}'")
        page.get_by_text("Sampling (the same for every column").click()
        max_new = page.locator("#max-new input[type=number]")
        max_new.fill(str(MAX_NEW_TOKENS))
        max_new.press("Tab")

        page.get_by_text("Evaluation: prompt, retrieve or tune?").click()
        prompts = page.locator("#eval-prompts input[type=number]")
        for _ in range(5):  # the slider's box takes a typed value on blur; type again until it holds
            prompts.fill(str(PROMPTS))
            prompts.press("Tab")
            page.wait_for_timeout(300)
            if prompts.input_value() == str(PROMPTS):
                break
        before = (signoff_run / "eval.json").stat().st_mtime_ns if (signoff_run / "eval.json").is_file() else None
        page.locator("#eval-run").click()
        # the run's earlier evaluation is on screen already: wait for this click's own eval.json, then its sentence
        deadline = time.monotonic() + EVAL_TIMEOUT_MS / 1000
        while True:
            changed = (signoff_run / "eval.json").is_file() and (signoff_run / "eval.json").stat().st_mtime_ns != before
            result = saved_result(signoff_run) if changed else {}
            if result.get("three_way"):
                break
            assert time.monotonic() < deadline, "the evaluation wrote no eval.json"
            page.wait_for_timeout(500)
        page.wait_for_function(f"() => document.querySelector('#eval-verdict').innerText.includes("
                               f"{json.dumps(result['three_way']['sentence'])})", timeout=60_000)
        page.wait_for_timeout(500)
        verdict = page.locator("#eval-verdict").inner_text()
        # the sentence measured for this run, in words, with what retrieval was shown and what it cost
        assert result["three_way"]["sentence"] in verdict
        assert f"the {result['three_way']['k']} training conversations most like each question" in verdict
        assert f"{result['three_way']['added_prompt_tokens']:g} more prompt tokens a reply" in verdict
        metrics = page.locator("#eval-metrics")
        heads = metrics.locator("thead th").all_inner_texts()
        assert [h.strip() for h in heads[:4]] == ["metric", "base + brand brief", "base + retrieved examples", "tuned"]
        text = metrics.inner_text()
        for name in ("Replies with the agents' habit", "Wording close to the agents' reply",
                     "Replies that looped, never ended or said nothing", "Seconds per reply", "Prompt tokens read per reply"):
            assert name in text
        habit = result["metrics"]["habit"]
        assert f"{habit['tuned']['count']} of {PROMPTS}" in text and "{" not in text  # counts in words, no JSON
        shot(page, tmp_path, "eval-three-ways", "eval-section")
        # the replies side by side, a row per question (gradio's table body holds layout rows too: read its text)
        table = page.locator("#eval-rows").inner_text()
        for row in result["rows"]:
            assert row["prompt"] in table and row["retrieved"].split()[0] in table
        browser.close()
