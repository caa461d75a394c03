"""Feedback in the real page (headless Chromium) on a real run: a thumb, a reply edited in place that the chat
continues from, and a blind A/B vote whose sources show only after the vote, with the running win rate.

Screenshots go to the test's tmp dir and to /work/notes/shots/ (when that folder can be made) to look at."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from app_server import running_app

from tuner import feedback
from tuner.runs import Run

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/work/notes/shots")
CHAT_TIMEOUT_MS = 180_000
MAX_NEW_TOKENS = 24
BETTER = "Unplug it for ten seconds, then plug it back in. **Stay sunny**, the Lumen Lamps team."
SHOWN = BETTER.replace("**", "")  # the reply's Markdown rendered: bold, no raw asterisks (issue 27)
CONVERT_TIMEOUT_MS = 180_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, signoff_run):
    home = Path(os.environ["TUNER_HOME"])
    log = tmp_path_factory.mktemp("feedback_browser") / "app.log"
    with running_app(home, log, env={"GRADIO_IS_E2E_TEST": "1"}) as srv:
        yield srv


@pytest.fixture
def page(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(server.url)
        pg.get_by_role("tab", name="1. Data").wait_for()
        yield pg
        browser.close()


def shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
    except OSError:  # another machine without the notes folder: the tmp copy is enough
        pass


def bot_texts(page, elem_id: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{elem_id} [data-testid=bot]").all_inner_texts()]


def send(page, text: str, replies: int) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    try:
        page.wait_for_function(f"() => document.querySelectorAll('#chat-tuned [data-testid=bot]').length === "
                               f"{replies}", timeout=CHAT_TIMEOUT_MS)
        page.locator("#chat-stop").wait_for(state="hidden", timeout=CHAT_TIMEOUT_MS)
    except PlaywrightTimeout:  # what the page showed, to tell a slow machine from a chat that never answered
        try:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "fb-chat-timeout.png"), full_page=True)
        except OSError:
            pass
        raise AssertionError(f"no reply {replies} in {CHAT_TIMEOUT_MS / 1000:.0f} s; tuned column: "
                             f"{bot_texts(page, 'chat-tuned')}, left column: {bot_texts(page, 'chat-base')}, "
                             f"run: {page.locator('#pg-run input').input_value()!r}") from None


def test_thumb_edit_in_place_and_a_blind_vote_in_the_page(page, signoff_run, tmp_path):
    run_id = signoff_run.name
    before = len(feedback.records(signoff_run))
    page.get_by_role("tab", name="3. Playground").click()
    run_box = page.locator("#pg-run input")
    page.wait_for_function("() => document.querySelector('#pg-run input')?.value", timeout=30_000)
    if run_box.input_value() != run_id:
        run_box.click()
        page.get_by_role("option", name=run_id, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#pg-run input')?.value === '{run_id}'")
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dana")
    page.get_by_text("Sampling (the same for every column").click()
    max_new = page.locator("#max-new input[type=number]")
    max_new.fill(str(MAX_NEW_TOKENS))
    max_new.press("Tab")
    note = page.locator("#feedback-note")

    # 1. a thumb down under the base model's reply
    send(page, "Hi, my lamp flickers since Monday.", 1)
    page.locator("#chat-base").get_by_role("button", name="Dislike", exact=True).click()
    page.wait_for_function("() => document.querySelector('#feedback-note').innerText.includes('thumbs down on the "
                           "base reply')", timeout=30_000)
    assert "judgement" in note.inner_text()

    # a customer's message is not a reply to judge: the edit is refused, and the message is put back
    question = page.locator("#chat-tuned [data-testid=user]").first
    question.hover()
    page.locator("#chat-tuned").get_by_role("button", name="Edit").first.click()
    page.locator("#chat-tuned textarea").fill("Something else entirely.")
    page.locator("#chat-tuned").get_by_role("button", name="Submit").click()
    page.wait_for_function("() => document.querySelector('#feedback-note').innerText.includes('Not saved')",
                           timeout=30_000)
    assert "customer's, not a reply" in note.inner_text()
    page.wait_for_function("() => document.querySelector('#chat-tuned [data-testid=user]').innerText.trim() === "
                           "'Hi, my lamp flickers since Monday.'", timeout=10_000)

    # 2. the tuned reply edited in place: the better reply stays in the chat
    model_reply = bot_texts(page, "chat-tuned")[0]
    page.locator("#chat-tuned [data-testid=bot]").first.hover()
    page.locator("#chat-tuned").get_by_role("button", name="Edit").nth(1).click()  # [0] is the customer's message
    editor = page.locator("#chat-tuned textarea")
    assert editor.input_value().strip() == model_reply  # the editor starts from the reply as shown
    editor.fill(BETTER)
    page.locator("#chat-tuned").get_by_role("button", name="Submit").click()
    page.wait_for_function("() => document.querySelector('#feedback-note').innerText.includes('your better reply')",
                           timeout=30_000)
    assert bot_texts(page, "chat-tuned") == [SHOWN]
    assert page.locator("#chat-tuned [data-testid=bot] strong").first.inner_text() == "Stay sunny"
    shot(page, tmp_path, "fb-01-edited-reply")

    # the conversation continues from the edited reply: the next turn's record holds it as history
    send(page, "Thanks! It still hums a little.", 2)
    assert bot_texts(page, "chat-tuned")[0] == SHOWN
    page.locator("#chat-tuned").get_by_role("button", name="Like", exact=True).last.click()  # the newest reply
    page.wait_for_function("() => document.querySelector('#feedback-note').innerText.includes('thumbs up on the "
                           "tuned reply')", timeout=30_000)
    # the thumbs stay lit when the chat redraws for the next turn
    assert page.locator("#chat-base").get_by_role("button", name="Disliked", exact=True).count() == 1
    assert page.locator("#chat-tuned").get_by_role("button", name="Liked", exact=True).count() == 1
    thumb_down, edit, thumb_up = feedback.records(signoff_run)[before:]
    assert thumb_down["judgement"] == {"thumb": "down"} and thumb_down["replies"][0]["source"] == "base"
    assert edit["judgement"] == {"edited": BETTER} and edit["replies"][0] == {"source": run_id, "text": model_reply}
    assert thumb_up["prompt"][-2:] == [{"role": "assistant", "content": BETTER},
                                       {"role": "user", "content": "Thanks! It still hums a little."}]
    assert {r["reviewer"] for r in (thumb_down, edit, thumb_up)} == {"Dana"}
    shot(page, tmp_path, "fb-02-continued-from-edit")

    # the liked reply edited: it is the reviewer's reply now, so the model's thumb goes out
    page.locator("#chat-tuned [data-testid=bot]").last.hover()
    page.locator("#chat-tuned").get_by_role("button", name="Edit").last.click()
    page.locator("#chat-tuned textarea").fill("Try another socket first, then write to us. " + BETTER)
    page.locator("#chat-tuned").get_by_role("button", name="Submit").click()
    page.wait_for_function("() => document.querySelectorAll('#chat-tuned [data-testid=bot]')[1]?.innerText"
                           ".includes('Try another socket first')", timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#chat-tuned [aria-label=Liked]')", timeout=10_000)
    assert page.locator("#chat-base").get_by_role("button", name="Disliked", exact=True).count() == 1
    assert feedback.records(signoff_run)[-1]["kind"] == "edit"

    # 3. blind A/B: two replies labelled A and B, no source named until the vote
    page.get_by_text("Blind A/B: which reply is better?").click()
    page.locator("#ab-input textarea").fill("Where is my order? It has been a week.")
    page.locator("#ab-go").click()
    page.wait_for_function("() => document.querySelector('#ab-a textarea')?.value && "
                           "document.querySelector('#ab-b textarea')?.value", timeout=CHAT_TIMEOUT_MS)
    section = page.locator("#ab-section")
    assert section.get_by_text("Reply A", exact=True).is_visible() and section.get_by_text("Reply B").is_visible()
    reveal = page.locator("#ab-reveal")
    assert "Which reply is better?" in reveal.inner_text()
    shown = "\n".join([reveal.inner_text(), page.locator("#ab-a textarea").input_value(),
                       page.locator("#ab-b textarea").input_value()])
    assert run_id not in shown and "base model" not in shown
    shot(page, tmp_path, "fb-03-blind-pair")

    page.locator("#ab-vote").get_by_text("B is better").click()
    page.wait_for_function("() => document.querySelector('#ab-reveal').innerText.includes('B was')", timeout=30_000)
    said = reveal.inner_text()
    assert f"{run_id} (this run)" in said and "the base model" in said
    vote = feedback.records(signoff_run)[-1]
    assert vote["kind"] == "vote" and vote["judgement"]["choice"] == "B" and vote["reviewer"] == "Dana"
    label = {run_id: f"{run_id} (this run)", "base": "the base model"}
    assert f"B was {label[vote['judgement']['b']]}. Winner: {label[vote['judgement']['b']]}." in said
    rates = page.locator("#ab-rates").inner_text()
    assert all(label[s] in rates for s in (run_id, "base")) and "%" in rates and " to " in rates
    assert page.locator("#ab-vote input").first.is_disabled()  # one vote per pair
    # on a laptop's width the win rates show whole (beside the counts, half a 1024 px page cut the last columns)
    page.set_viewport_size({"width": 1024, "height": 900})
    page.wait_for_timeout(500)
    assert not cut_off(page, "ab-rates"), "the win-rate table is cut off"
    shot(page, tmp_path, "fb-04-vote-revealed")

    # 4. a vote is for the pair on screen: with a pair open, ask for the next one and vote at once (a fast double
    # action); nothing may be stored for the pair the reviewer has not seen yet
    pair_id = page.locator("#ab-pair-id textarea, #ab-pair-id input").first
    page.locator("#ab-input textarea").fill("Can I return a bulb I opened?")
    page.locator("#ab-go").click()
    page.wait_for_function("() => document.querySelector('#ab-pair-id textarea, #ab-pair-id input')?.value",
                           timeout=CHAT_TIMEOUT_MS)
    seen = {"id": pair_id.input_value(), "a": page.locator("#ab-a textarea").input_value(),
            "b": page.locator("#ab-b textarea").input_value()}
    before = len(feedback.records(signoff_run))
    page.locator("#ab-input textarea").fill("Do you ship to Spain?")
    page.locator("#ab-go").click()
    page.locator("#ab-vote").get_by_text("A is better").click(force=True, no_wait_after=True)
    page.wait_for_function(f"() => {{ const v = document.querySelector('#ab-pair-id textarea, #ab-pair-id input')"
                           f"?.value; return v && v !== '{seen['id']}'; }}", timeout=CHAT_TIMEOUT_MS)
    new_id = pair_id.input_value()
    stored = feedback.records(signoff_run)[before:]
    # the quick vote was taken for the pair on screen when it was cast, or refused: never for the new pair
    assert all(r["judgement"]["pair"] == seen["id"] and [x["text"] for x in r["replies"]] == [seen["a"], seen["b"]]
               for r in stored), stored
    assert new_id not in {r["judgement"].get("pair") for r in feedback.records(signoff_run)}
    assert not page.locator("#ab-vote input").first.is_disabled()  # the new pair is open for its own vote
    page.locator("#ab-vote").get_by_text("A is better").click()
    page.wait_for_function("() => document.querySelector('#ab-reveal').innerText.includes('A was')", timeout=30_000)
    vote = feedback.records(signoff_run)[-1]
    assert vote["judgement"]["pair"] == new_id and vote["replies"][0]["text"] == page.locator("#ab-a textarea").input_value()
    shot(page, tmp_path, "fb-04b-vote-bound-to-pair")

    # the Runs tab shows a run (never none beside a list), and the same win rates, whole
    page.get_by_role("tab", name="4. Runs").click()
    page.wait_for_function("() => document.querySelector('#runs-pick input')?.value", timeout=30_000)
    pick_box = page.locator("#runs-pick input")
    page.locator("#run-details").get_by_text(pick_box.input_value()).first.wait_for(timeout=30_000)
    if pick_box.input_value() != run_id:
        pick_box.click()
        page.get_by_role("option", name=run_id, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#feedback-wins')?.innerText.includes('{run_id} (this run)')",
                           timeout=30_000)
    assert not cut_off(page, "feedback-wins"), "the win-rate table is cut off"
    shot(page, tmp_path, "fb-06-runs-tab-win-rates")


def cut_off(page, elem_id: str) -> list[str]:
    """The cells of a table that do not show whole (their text wider than the cell, or past the table's box)."""
    return page.eval_on_selector(f"#{elem_id}", """el => {
        const box = el.getBoundingClientRect();
        return [...el.querySelectorAll('td, th')].filter(c => {
            const r = c.getBoundingClientRect();
            return r.width > 0 && (r.right > box.right + 1 || c.scrollWidth > c.clientWidth + 1);
        }).map(c => c.innerText);
    }""")


def test_the_train_tab_estimate_learns_from_the_run_that_finished_here(page, signoff_run, tmp_path):
    """Issue 27: after runs had finished, the estimate still said none had. It is redone when the data arrives
    and names the finished run it learned this machine's speed from."""
    rows = [{"messages": [{"role": "user", "content": f"Does lamp {i} come in blue?"},
                          {"role": "assistant", "content": f"Lamp {i} does. Stay sunny, the Lumen Lamps team."}]}
            for i in range(16)]
    upload = tmp_path / "lamps.jsonl"
    upload.write_text("\n".join(json.dumps(r) for r in rows))
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    page.locator("#report").get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
    report = page.locator("#report").inner_text()  # an epoch's time in the one unit, not "0.0 min on a CPU"
    assert re.search(r"One epoch is about [\d,]+ tokens?: (under 1 s|\d+ s|\d+ min \d\d s) on a CPU", report), report
    page.locator("#to-train").click()
    estimate = page.locator("#estimate")
    estimate.get_by_text("Learned from this machine's last finished run of this model").wait_for(timeout=60_000)
    said = estimate.inner_text()
    assert "No run of this model has finished" not in said
    assert re.search(r"Estimate: 24 steps of 8 examples \(1 epoch of \d+ examples is 2 steps, raised to the "
                     r"preset's minimum of 24 steps", said), said
    shot(page, tmp_path, "fb-07-train-estimate-learned")


def test_a_preference_run_shows_its_parent_beside_it(page, signoff_run, tmp_path):
    """A child run (a copy of the run whose status names it as parent): the left column becomes the parent."""
    child = signoff_run.parent / "signoff-child"
    if not child.exists():
        shutil.copytree(signoff_run, child, ignore=shutil.ignore_patterns("feedback.jsonl", "checkpoints"))
    Run(child).update_status(parent=signoff_run.name, method="dpo")
    page.get_by_role("tab", name="3. Playground").click()  # opening the tab lists the runs finished since
    page.locator("#pg-run input").click()
    page.get_by_role("option", name=child.name, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#pg-left input')?.value === "
                           f"'Its parent run: {signoff_run.name}'", timeout=30_000)
    page.locator("#chat-base").get_by_text(f"Parent run: {signoff_run.name}").wait_for(timeout=30_000)
    page.get_by_text("Sampling (the same for every column").click()
    max_new = page.locator("#max-new input[type=number]")
    max_new.fill(str(MAX_NEW_TOKENS))
    max_new.press("Tab")
    send(page, "Is the Nova waterproof?", 1)
    page.wait_for_function("() => document.querySelectorAll('#chat-base [data-testid=bot]').length === 1 && "
                           "document.querySelector('#chat-base [data-testid=bot]').innerText.trim()",
                           timeout=CHAT_TIMEOUT_MS)
    # the same adapter in both columns (a copy): the same reply, greedy
    assert bot_texts(page, "chat-base") == bot_texts(page, "chat-tuned")
    shot(page, tmp_path, "fb-05-parent-beside-child")
