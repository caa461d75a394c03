"""The real page in headless Chromium: upload a transcript, read the report, train, watch it finish, chat.

Screenshots of every stage go to test-artifacts/ (gitignored), to look at when something fails.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from app_server import running_app

from tuner.ui import data_tab

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "kettle_transcripts.txt"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CONVERT_TIMEOUT_MS = 180_000  # the first conversion loads transformers and the tokenizer
TRAIN_STEPS = 6  # the quick preset, shortened in the page for test time
TRAIN_TIMEOUT_MS = 300_000
CHAT_TIMEOUT_MS = 180_000
MAX_NEW_TOKENS = 40  # replies long enough to compare, short enough for a CPU under load
LONG_REPLY_TOKENS = 300  # a reply long enough to stop while it streams
POLL_MS = 2000  # the Train tab's polling interval (tuner.ui.train_tab.POLL_SECONDS)
TRAIN_COLOR, EVAL_COLOR = "#f97316", "#2563eb"  # the loss curves (tuner.ui.train_tab.LOSS_COLORS)
SMOOTH_COLOR = "#9a3412"  # the train loss, smoothed

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("browser_home")
    # GRADIO_IS_E2E_TEST: gradio forgets a closed tab's state after 1 s instead of an hour
    with running_app(home, home / "app.log", env={"GRADIO_IS_E2E_TEST": "1"}) as srv:
        yield srv


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def open_page(browser, server, request):
    """Open the app in a new tab; if the test fails, its open tabs are saved as FAILED-*.png."""
    opened = []
    failed_before = request.session.testsfailed

    def _open():
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server.url)
        page.get_by_role("tab", name="1. Data").wait_for()
        opened.append(page)
        return page, dialogs

    yield _open
    for i, page in enumerate(opened):
        if not page.is_closed():
            if request.session.testsfailed > failed_before:
                shot(page, f"FAILED-{request.node.name}-{i}")
            page.close()


def bot_texts(page, elem_id: str) -> list[str]:
    return [t.strip() for t in page.locator(f"#{elem_id} .message.bot").all_inner_texts()]


def bar_counts(page, elem_id: str) -> list[int]:
    """The bars of a gr.BarPlot, read from the chart's own accessible labels ("…; examples: 12")."""
    labels = page.eval_on_selector_all(f"#{elem_id} [aria-roledescription='bar']",
                                       "els => els.map(e => e.getAttribute('aria-label') || '')")
    return [int(m.group(1)) for m in (re.search(r"examples: (\d+)", label) for label in labels) if m]


def crew_log(path: Path, n: int = 12) -> Path:
    """A chat log whose speakers tuner does not know: the page must ask which of them is the team."""
    lines = []
    for i in range(n):
        lines += [f"=== Chat {i} ===", f"Jo: Hello, question {i} about my kettle?", f"Skipper: Ahoy! Answer {i}.", ""]
    path.write_text("\n".join(lines))
    return path


def small_jsonl(path: Path, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Is the tea tin number {i} back in stock?"},
                          {"role": "assistant", "content": f"Tin {i} is back on Monday. Cheers, the Tea Crew"}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def wait_for_bars(page, total: int) -> None:
    """Wait until the length histogram's bars count `total` examples."""
    page.wait_for_function("n => [...document.querySelectorAll(\"#histogram [aria-roledescription='bar']\")]"
                           ".map(e => +((e.getAttribute('aria-label') || '').match(/examples: (\\d+)/) || [0, 0])[1])"
                           ".reduce((a, b) => a + b, 0) === n", arg=total, timeout=30_000)


def remove_file(page, name: str) -> None:
    page.locator(f"#upload tr:has(td[aria-label='{name}'])").get_by_role("button", name="Remove this file").click()


def test_replacing_or_clearing_files_leaves_no_stale_view(open_page, tmp_path):
    page, dialogs = open_page()
    upload = page.locator("#upload input[type=file]")
    report, speakers = page.locator("#report"), page.locator("#speakers")

    # 1. the sample: its report, bars and preview
    upload.set_input_files(str(SAMPLE))
    report.get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
    wait_for_bars(page, 96)
    assert "96 conversations kept, none dropped" in report.inner_text() and not speakers.is_visible()
    assert bot_texts(page, "preview")[0].startswith("Ahoy there, shipmate!")
    shot(page, "10-views-sample")

    # 2. the box's Clear: every view is empty again, the histogram's bars included
    page.locator("#upload").get_by_role("button", name="Clear").click()
    report.get_by_text("Upload your exports").wait_for(timeout=30_000)
    page.wait_for_timeout(1500)  # time for a stale redraw to show, if there were one
    assert bar_counts(page, "histogram") == [] and bot_texts(page, "preview") == []
    assert "kettle" not in page.locator("#files-table").inner_text() + page.locator("#dropped-table").inner_text()
    assert page.locator("#to-train").is_disabled()
    shot(page, "11-views-cleared")

    # 3. a log with unknown speakers: the page asks about them
    upload.set_input_files(str(crew_log(tmp_path / "crew.txt")))
    report.get_by_text("Some speakers have no role").wait_for(timeout=CONVERT_TIMEOUT_MS)
    speakers.wait_for(state="visible", timeout=10_000)
    assert "Skipper" in speakers.inner_text() and "Jo" in speakers.inner_text()
    assert bar_counts(page, "histogram") == []  # nothing kept, nothing to plot
    shot(page, "12-views-crew")

    # 4. replaced by another file (added beside it, then the crew log's own x): every view is the new file's
    upload.set_input_files(str(small_jsonl(tmp_path / "tea.jsonl")))
    report.get_by_text("12 conversations kept, 12 dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    remove_file(page, "crew.txt")
    report.get_by_text("12 conversations kept, none dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    wait_for_bars(page, 12)
    files = page.locator("#files-table").inner_text()
    assert "Ready to train" in report.inner_text() and "tea.jsonl" in files and "crew" not in files
    assert bot_texts(page, "preview")[0].startswith("Tin 0 is back on Monday")
    assert not speakers.is_visible() and page.locator("#to-train").is_enabled()
    shot(page, "13-views-replaced")
    assert dialogs == []


def test_ticked_team_speakers_stay_ticked_when_files_are_added_or_removed(open_page, tmp_path):
    page, dialogs = open_page()
    upload = page.locator("#upload input[type=file]")
    report, speakers = page.locator("#report"), page.locator("#speakers")
    upload.set_input_files(str(crew_log(tmp_path / "crew.txt")))
    speakers.wait_for(state="visible", timeout=CONVERT_TIMEOUT_MS)
    speakers.get_by_label("Skipper").check()
    page.locator("#check-data").click()
    report.get_by_text("12 conversations kept, none dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    assert "Ready to train" in report.inner_text()

    # another file added: the crew log's speakers are still listed, Skipper still ticked, both files kept
    upload.set_input_files(str(small_jsonl(tmp_path / "tea.jsonl")))
    report.get_by_text("24 conversations kept, none dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    assert speakers.get_by_label("Skipper").is_checked() and not speakers.get_by_label("Jo").is_checked()
    wait_for_bars(page, 24)
    shot(page, "14-speakers-file-added")

    # the other file removed: the same
    remove_file(page, "tea.jsonl")
    report.get_by_text("12 conversations kept, none dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    assert speakers.get_by_label("Skipper").is_checked() and "Ready to train" in report.inner_text()
    assert bot_texts(page, "preview")[0].startswith("Ahoy! Answer 0.")  # Skipper speaks for the team

    # a file without those speakers: the list goes; adding the crew log back asks again (nothing guessed)
    upload.set_input_files(str(small_jsonl(tmp_path / "tea.jsonl")))
    report.get_by_text("24 conversations kept").wait_for(timeout=CONVERT_TIMEOUT_MS)
    remove_file(page, "crew.txt")
    report.get_by_text("12 conversations kept, none dropped").wait_for(timeout=CONVERT_TIMEOUT_MS)
    speakers.wait_for(state="hidden", timeout=10_000)
    shot(page, "15-speakers-file-removed")
    assert dialogs == []


# gradio's translation namespaces (gradio/templates/frontend/assets/en-*.js): "common.upload" on a page is a key
# that was never translated
RAW_KEY = re.compile(r"\b(?:_name|annotated_image|audio|blocks|chat_interface|chatbot|checkbox|code|color_picker|common|"
                     r"dataframe|dropdown|errors|file|highlighted_text|image|image_editor|label|login|number|plot|radio|"
                     r"slider|status|upload_text|video)\.[a-z_]+\b")
# every text and label the page ever showed, also those shown for a moment (the screen-reader line that
# announces an event's end is cleared after a second)
RECORD_TEXTS = """
window.__texts = [];
new MutationObserver(changes => { for (const m of changes) {
  if (m.type === 'characterData') window.__texts.push(m.target.data);
  else if (m.type === 'attributes') window.__texts.push(m.target.getAttribute(m.attributeName) || '');
  else for (const n of m.addedNodes) {  // what is shown: the body's text, not the page's scripts and styles
    if (!document.body?.contains(n) || ['SCRIPT', 'STYLE'].includes(n.nodeName)) continue;
    if (n.nodeType === 1) window.__texts.push(n.innerText || '');
    else if (n.nodeType === 3 && !['SCRIPT', 'STYLE'].includes(n.parentNode?.nodeName)) window.__texts.push(n.data);
  }
}}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true,
                       attributeFilter: ['aria-label', 'title', 'placeholder', 'alt']});
"""


def test_no_tab_shows_an_untranslated_key_or_a_table_without_its_headers(open_page, tmp_path):
    page, dialogs = open_page()
    page.add_init_script(RECORD_TEXTS)
    page.reload()
    page.get_by_role("tab", name="1. Data").wait_for()
    assert page.locator("#histogram").count() == 0  # no examples yet: no empty plot either
    for table, columns in (("files-table", data_tab.FILES_COLUMNS), ("dropped-table", data_tab.DROPPED_COLUMNS)):
        headers = [h.strip(" ⋮\n\t") for h in page.locator(f"#{table} thead th").all_inner_texts()]
        assert [h for h in headers if h] == columns, (table, headers)
    page.locator("#upload input[type=file]").set_input_files(str(small_jsonl(tmp_path / "tea.jsonl")))
    page.locator("#report").get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
    page.wait_for_timeout(500)
    shot(page, "16-no-raw-keys-data")
    for tab in ("2. Train", "3. Playground", "4. Runs", "1. Data"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1000)
        texts = page.evaluate("() => document.body.innerText + '\\n' + window.__texts.join('\\n') + '\\n' + "
                              "[...document.querySelectorAll('[aria-label],[title],[placeholder]')].map(e => "
                              "[e.getAttribute('aria-label'), e.getAttribute('title'), e.getAttribute('placeholder')]"
                              ".join(' ')).join('\\n')")
        assert sorted(set(RAW_KEY.findall(texts))) == [], tab
        # every table on the tab, open or folded away, is headed by its columns' names, never "1 2 3"
        numbered = page.evaluate("() => [...document.querySelectorAll('table thead')].map(t => [...t.querySelectorAll("
                                 "'th')].map(h => h.textContent.replace(/[⋮\\s]/g, '')).filter(Boolean))"
                                 ".filter(h => h.length && h.every(x => /^\\d+$/.test(x)))")
        assert numbered == [], (tab, numbered)
    # the end of an event, announced in words; gradio's screen-reader line speaks at most once in 5 s and keeps
    # only the latest message, so "Done" may come a few seconds after the last tab's event
    page.wait_for_function("() => window.__texts.some(t => t.includes('Done'))", timeout=15_000)
    assert dialogs == []


def test_html_in_uploaded_messages_is_shown_as_text_and_never_runs(open_page, server, tmp_path):
    page, dialogs = open_page()
    payload = '<img src=x onerror="alert(1)"><script>alert(2)</script><b>bold?</b>'
    topics = ["kettle", "teapot", "mug", "strainer", "caddy", "infuser", "tray", "cosy", "spoon", "timer", "lid",
              "filter"]
    rows = [{"messages": [{"role": "user", "content": f"Is the {t} in stock? {payload}"},
                          {"role": "assistant", "content": f"The {t} ships today <a href='javascript:alert(3)'>link</a>"}]}
            for t in topics]
    bad = tmp_path / "html.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.locator("#report").get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
    preview = page.locator("#preview")
    preview.get_by_text('in stock? <img src=x onerror="alert(1)">', exact=False).first.wait_for()
    assert preview.locator("img[src=x], script, b, a[href^=javascript]").count() == 0
    page.wait_for_timeout(500)
    shot(page, "00-html-shown-as-text")
    assert dialogs == []

    # the upload lives in this session's own folder, and goes when the session ends
    folders = [p.parents[1] for p in (server.home / "uploads").glob("*/files/html.jsonl")]
    assert len(folders) == 1
    page.close()
    deadline = time.monotonic() + 30
    while folders[0].exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folders[0].exists()


def test_a_start_while_another_job_trains_waits_in_line_in_words_without_an_error(open_page, server, tmp_path):
    """Issue 23: Start training while another user's job holds the machine queued the run, said so on the
    page and in the queue table, and showed no error badge or toast; its owner cancels it from the page."""
    import os
    import signal

    from conftest import hold_machine_lock, signoff_conversations

    from tuner import runs
    from tuner.config import TrainConfig

    data = tmp_path / "alice-data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in signoff_conversations(12)))
    alice = runs.prepare_run(TrainConfig.from_preset("quick"), data, run_dir=server.home / "runs" / "alice-job")
    holder = hold_machine_lock(alice.name, home=server.home)
    try:
        runs.update_status(alice, status="running", owner="alice", pid=holder.pid, wait_from=time.time() - 60,
                           estimate_s=1800.0, step=3, max_steps=40)
        page, dialogs = open_page()
        page.locator("#upload input[type=file]").set_input_files(str(small_jsonl(tmp_path / "tea.jsonl")))
        page.locator("#report").get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
        page.locator("#to-train").click()
        page.locator("#start-training").click()
        page.locator('#progress [data-status="queued"]').wait_for(timeout=120_000)
        line = page.locator("#progress .run-line").inner_text()
        assert re.match(r"Queued: 1st in line behind alice's run \(training, about \d+ min \d\d s left\)", line), line
        assert "You can close this page" in line
        table = page.locator("#queue-table")
        table.get_by_text("1st", exact=True).first.wait_for(timeout=15_000)  # for everyone: the page's timer fills it
        rows = table.inner_text()
        assert "training" in rows and "alice-job" in rows and "about " in rows, rows
        assert "1 run waits in line" in page.locator("#queue").inner_text()
        page.wait_for_timeout(1000)
        shot(page, "17-queued-behind-another-job")
        # no error anywhere: no toast, no red badge on the button's output, no pop-up
        assert page.locator(".toast-body").count() == 0 and page.get_by_text("Error", exact=True).count() == 0
        assert dialogs == []
        page.locator("#cancel").click()  # the run's owner (here: nobody signed in) leaves the queue
        page.locator('#progress [data-status="cancelled"]').wait_for(timeout=30_000)
        assert "waited in the queue" in page.locator("#progress").inner_text()
        page.wait_for_function("() => !document.querySelector('#queue-table')?.innerText.includes('1st')",
                               timeout=15_000)
        assert page.locator(".toast-body").count() == 0
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        runs.update_status(alice, status="cancelled", pid=None)


def test_upload_train_watch_and_chat(open_page):
    started = time.monotonic()
    page, dialogs = open_page()

    # 1. Data: upload a transcript, read the report
    page.locator("#upload input[type=file]").set_input_files(str(SAMPLE))
    report = page.locator("#report")
    report.get_by_text("Ready to train").wait_for(timeout=CONVERT_TIMEOUT_MS)
    assert "96 conversations kept, none dropped" in report.inner_text()
    assert "transcript-txt" in page.locator("#files-table").inner_text()
    page.locator("#preview .message.bot").first.wait_for()
    assert bot_texts(page, "preview")[0].startswith("Ahoy there, shipmate!")
    shot(page, "01-data-report")

    # 2. Train: the quick preset, shortened; estimate, start, watch it finish
    page.locator("#to-train").click()
    steps = page.get_by_label("Max steps")
    steps.fill(str(TRAIN_STEPS))
    steps.press("Tab")
    page.get_by_text("More settings").click()
    voice = page.get_by_label("Voice-check questions")  # its own tests ask them; here they would only add minutes
    voice.fill("0")
    voice.press("Tab")
    page.get_by_role("button", name="Estimate time and memory").click()
    page.locator("#estimate").get_by_text("Estimate").wait_for(timeout=60_000)
    # the steps the field says are the steps the estimate counts, and it says why
    page.locator("#estimate").get_by_text(f"{TRAIN_STEPS} steps of 8 examples (max steps is {TRAIN_STEPS})").wait_for(
        timeout=60_000)
    page.locator("#start-training").click()
    progress = page.locator("#progress .run-progress")
    progress.wait_for(timeout=60_000)
    page.locator('#progress [data-status="running"]').wait_for(timeout=90_000)
    # before the first step ends, the status says what is happening, and its clock moves between polls
    line = page.locator("#progress .run-line")
    first = line.inner_text()
    page.wait_for_timeout(3 * POLL_MS)
    second = line.inner_text()
    assert "running for" in first and second != first, (first, second)
    assert re.match(r"(Loading|Evaluating|Training|Measuring|Saving|Asking)", second), second
    shot(page, "02-training-starts")
    # the first optimizer step is logged: the plot draws it at once (both colours), the log says it in words
    page.wait_for_function(f"() => document.querySelectorAll(\"#loss-plot circle[fill='{TRAIN_COLOR}']\").length > 0",
                           timeout=TRAIN_TIMEOUT_MS)
    assert page.locator(f"#loss-plot circle[fill='{EVAL_COLOR}']").count() > 0  # the starting held-out loss
    assert "training loss" in page.locator("#train-log textarea").input_value()
    shot(page, "02-training")

    # closing the tab does not stop training; a new tab shows the run, read from disk
    page.close()
    page, dialogs = open_page()
    page.get_by_role("tab", name="2. Train").click()
    page.wait_for_function("() => document.querySelector('#train-run input')?.value.startsWith('run-')")
    run_id = page.locator("#train-run input").input_value()
    page.locator('#progress [data-status="completed"]').wait_for(timeout=TRAIN_TIMEOUT_MS)
    assert f"step {TRAIN_STEPS} / {TRAIN_STEPS}" in page.locator("#progress").inner_text()
    # the epochs the run really made: 6 steps of 8 examples over the sample's training examples
    assert re.search(rf"{TRAIN_STEPS * 8} of {TRAIN_STEPS * 8} examples seen \(0\.\d+ epochs of \d+ examples\)",
                     page.locator("#progress").inner_text())
    page.wait_for_timeout(2500)  # one more poll so the plot has the final points
    for color in (TRAIN_COLOR, SMOOTH_COLOR, EVAL_COLOR):  # every curve, each in its colour
        assert page.locator(f"#loss-plot path[stroke='{color}']").count() > 0, color
    page.get_by_text("Raw log (train.log)").click()
    assert page.locator("#raw-log textarea").input_value().strip()  # the raw lines are a click away
    shot(page, "03-trained")

    # 3. Playground: the finished run is picked; one prompt, both columns answer side by side
    page.get_by_role("tab", name="3. Playground").click()
    page.wait_for_function(f"() => document.querySelector('#pg-run input')?.value === '{run_id}'", timeout=30_000)
    page.get_by_text("Sampling (the same for every column").click()
    max_new = page.locator("#max-new input[type=number]")
    max_new.fill(str(MAX_NEW_TOKENS))
    max_new.press("Tab")
    page.locator("#chat-input textarea").fill("Hi, where is my order KC-12345? It's been a week.")
    send = page.locator("#chat-send")
    send.click()
    page.locator("#chat-tuned .message.bot").first.wait_for(timeout=CHAT_TIMEOUT_MS)
    shot(page, "04-playground-streaming")
    send.wait_for(state="visible", timeout=CHAT_TIMEOUT_MS)
    base, tuned = bot_texts(page, "chat-base"), bot_texts(page, "chat-tuned")
    shot(page, "05-playground")
    assert len(base) == len(tuned) == 1 and base[0] and tuned[0]
    assert base[0] != tuned[0]  # the adapter changed the reply

    # 4. Stop a long reply while it streams, then send another: nothing needs a reload
    max_new.fill(str(LONG_REPLY_TOKENS))
    max_new.press("Tab")
    page.locator("#chat-input textarea").fill("Write a long story about a kettle that sails around the world.")
    send.click()
    stop = page.locator("#chat-stop")
    stop.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => (document.querySelectorAll('#chat-base .message.bot')[1]?.innerText || '')"
                           ".trim().split(/\\s+/).length >= 3", timeout=CHAT_TIMEOUT_MS)  # a few words written
    stop.click()  # fails if the reply had already finished: Stop is only shown while replies stream
    send.wait_for(state="visible", timeout=30_000)
    cut = bot_texts(page, "chat-base")[1]
    page.wait_for_timeout(2000)
    assert bot_texts(page, "chat-base")[1] == cut and 0 < len(cut.split()) < LONG_REPLY_TOKENS  # it stopped there
    shot(page, "06-playground-stopped")
    max_new.fill(str(MAX_NEW_TOKENS))
    max_new.press("Tab")
    page.locator("#chat-input textarea").fill("Thanks! And where is my order?")
    send.click()
    page.wait_for_function("() => document.querySelectorAll('#chat-tuned .message.bot').length === 3",
                           timeout=CHAT_TIMEOUT_MS)
    stop.wait_for(state="hidden", timeout=CHAT_TIMEOUT_MS)
    assert all(bot_texts(page, column)[2] for column in ("chat-base", "chat-tuned"))

    # 5. Evaluate three ways on two held-out prompts: progress says n of N, the metrics are named in words
    page.get_by_text("Evaluation: prompt, retrieve or tune?").click()
    prompts = page.locator("#eval-prompts input[type=number]")
    for _ in range(5):  # the slider's box takes a typed value on blur; type again until it holds
        prompts.fill("2")
        prompts.press("Tab")
        page.wait_for_timeout(300)
        if prompts.input_value() == "2":
            break
    n = int(prompts.input_value())
    page.locator("#eval-run").click()
    seen: list[str] = []
    deadline = time.monotonic() + CHAT_TIMEOUT_MS / 1000
    while "Wording close to the agents' reply" not in page.locator("#eval-metrics").inner_text():
        text = page.locator("#eval-section").inner_text()
        for found in re.findall(r"Base, retrieved and tuned answer prompts? [0-9-]+ of \d+|All \d+ prompts answered",
                                text):
            if found not in seen:
                seen.append(found)
        if len(seen) == 1:
            shot(page, "07-evaluating")
        assert time.monotonic() < deadline, seen
        page.wait_for_timeout(150)
    # it moved, in order: prompts being answered (n of N), then all answered while the losses are measured
    assert len(seen) >= 2 and seen[0].startswith("Base, retrieved and tuned answer") and seen[-1].startswith("All "), seen
    assert int(seen[-1].split()[1]) <= n  # each distinct held-out prompt once, at most the number asked for
    page.wait_for_timeout(500)
    shot(page, "08-evaluated")
    assert dialogs == []
    print(f"browser flow: {time.monotonic() - started:.0f} s")
