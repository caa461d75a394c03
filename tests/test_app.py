"""The page's API, called the way a script (gradio_client) or a stranger would: against the real app.py.

One app process serves the module (TUNER_HOME = the test session's home, small server-side limits);
each test opens its own client, i.e. its own browser session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from app_server import api_client, refused, running_app

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "kettle_transcripts.txt"
MAX_FILES = 4  # the app under test runs with TUNER_MAX_FILES=4 ...
MAX_UPLOAD_MB = 1  # ... TUNER_MAX_UPLOAD_MB=1 ...
MAX_NEW_TOKENS = 64  # ... and TUNER_MAX_NEW_TOKENS=64
ENV_TOKEN = "hf_ENVtokenTUNERtest0000000000000000"  # in the server's environment; must never be used for a visitor
USER_TOKEN = "hf_USERtokenTUNERtest111111111111111111"
PASSWD_MARKERS = ("root:x:", "root:*:", "/bin/bash", "/usr/sbin/nologin")




def _convert(client, path: Path = SAMPLE, system_prompt: str = "", redact: bool = False, team=()):
    from gradio_client import handle_file

    return client.predict([handle_file(str(path))], system_prompt, redact, list(team), "default",
                          api_name="/convert")


def _text(bubble: dict) -> str:
    """A chat bubble's text as gradio_client returns it (content parts; HTML-escaped for display)."""
    import html

    content = bubble["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    return html.unescape(text)


def _stale_run(home: Path) -> str:
    """A run folder left 'running' by a process that no longer exists (an app that crashed)."""
    from tuner.config import TrainConfig

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = home / "runs" / "stale-run"
    (run / "data").mkdir(parents=True, exist_ok=True)
    TrainConfig.from_preset("quick").save(run / "config.yaml")
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 3, "max_steps": 30, "pid": dead.pid,
                                                 "updated_at": time.time() - 600}))
    return run.name


@pytest.fixture(scope="module")
def home() -> Path:
    return Path(os.environ["TUNER_HOME"])


@pytest.fixture(scope="module")
def decoy(home) -> Path:
    """A run-shaped folder outside runs/: traversal probes aim at it; it must survive them all."""
    d = home / "decoy"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text("base_model: default\n")
    (d / "status.json").write_text(json.dumps({"status": "completed", "adapter": "adapter"}))
    (d / "secret.txt").write_text("DECOY-SECRET")
    return d


@pytest.fixture(scope="module")
def server(home, decoy, tmp_path_factory):
    stale = _stale_run(home)
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {"TUNER_MAX_FILES": str(MAX_FILES), "TUNER_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
           "TUNER_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "HF_TOKEN": ENV_TOKEN}
    with running_app(home, log, env=env) as srv:
        srv.stale_run = stale
        yield srv


@pytest.fixture
def client(server):
    return api_client(server)


# -- data ------------------------------------------------------------------------------------------


def test_convert_through_the_api_reports_the_sample(client):
    report, files, dropped, hist, _slider, system, preview, learned, _speakers = _convert(
        client, system_prompt="You are the crew of Kettle & Co.", redact=True)
    assert "Ready to train" in report
    assert "96 conversations kept, none dropped" in report
    assert "Personal data replaced" in report and "3 email" in report and "1 phone" in report
    assert files["data"][0][:2] == ["kettle_transcripts.txt", "transcript-txt"]
    assert dropped["data"] == []
    assert sum(count for _, count in hist["value"]["data"]) == 96  # every example lands in a length bin
    # the preview is the first converted example: its system prompt, then the customer and the crew
    assert system == "You are the crew of Kettle & Co."
    assert [m["role"] for m in preview][:2] == ["user", "assistant"]
    assert _text(preview[-1]).startswith("Ahoy there, shipmate!")
    # the tokens the model is trained on are exactly the replies (and their end-of-turn token)
    marked = [s["token"] for s in learned if s["class_or_confidence"] == "learned"]
    assert marked and all(t.startswith("Ahoy there") and t.endswith("<|im_end|>") for t in marked)
    assert not any("Hi, where is my order" in t for t in marked)


def test_try_the_sample_offers_the_shipped_transcript(client):
    files = client.predict(api_name="/sample")
    assert [Path(f["path"]).name for f in files] == ["kettle_transcripts.txt"]


def test_unmapped_speakers_are_asked_for_and_then_mapped(client, tmp_path):
    log = tmp_path / "crew.txt"
    lines = []
    for i in range(12):
        lines += [f"=== Chat {i} ===", f"Jo: Hello, question {i} about my kettle?",
                  f"Skipper: Ahoy! Answer {i}, fair winds.", ""]
    log.write_text("\n".join(lines))
    report, *_rest, speakers = _convert(client, log)
    assert "Not enough to train on yet" in report and "no role" in report
    assert speakers["visible"] is True and {c[0] for c in speakers["choices"]} == {"Jo", "Skipper"}
    # the same session ticks its crew member; Jo becomes the customer
    report, *_rest, preview, _learned, speakers = _convert(client, log, team=["Skipper"])
    assert "Ready to train" in report
    assert [m["role"] for m in preview] == ["user", "assistant"]
    assert _text(preview[1]).startswith("Ahoy! Answer")


def test_bad_file_gets_a_plain_message_without_traceback(client, tmp_path):
    bad = tmp_path / "export.jsonl"
    bad.write_bytes(b"\x00\x01\x02\xff\xfe binary \x00" * 100)
    report, files, dropped, *_ = _convert(client, bad)
    assert "Not enough to train on yet" in report
    assert dropped["data"] and dropped["data"][0][0] == "export.jsonl"
    assert "Traceback" not in report + json.dumps(dropped)


def test_two_sessions_never_see_each_others_uploads_or_examples(server, home):
    alice, bob = api_client(server), api_client(server)
    _convert(alice, system_prompt="ALICE-ONLY brief")
    system, bubbles, _ = alice.predict(1, "default", api_name="/example")
    assert system == "ALICE-ONLY brief" and bubbles
    # before any run, the page says what the quick preset cannot reach, and the standard one can
    quick = alice.predict("default", "quick", *_quick_settings(), api_name="/estimate")
    assert "96 examples are too few to expect your agents' habits on new questions" in quick
    standard = alice.predict("default", "standard", *_quick_settings(preset="standard"), api_name="/estimate")
    assert "Estimate" in standard and "too few" not in standard
    # Bob's session has no data: no preview, no estimate, no training on Alice's examples
    assert bob.predict(1, "default", api_name="/example") == ("", [], [])
    assert "tab first" in bob.predict("default", "quick", *_quick_settings(), api_name="/estimate")
    assert "nothing valid to train on" in refused(bob, "default", "quick", *_quick_settings(), api_name="/train")
    # on disk, each session has its own upload folder, named by a random id
    folders = [p for p in (home / "uploads").iterdir() if p.is_dir()]
    with_alice = [p for p in folders if "ALICE-ONLY" in (p / "data" / "train.jsonl").read_text(errors="ignore")
                  if (p / "data" / "train.jsonl").is_file()]
    assert len(with_alice) == 1


def _quick_settings(preset: str = "quick", **overrides) -> list:
    """The Train tab's settings in MAIN_SETTINGS + MORE_SETTINGS order, from the quick preset (or `preset`)."""
    from tuner.config import TrainConfig
    from tuner.ui.train_tab import MAIN_SETTINGS, MORE_SETTINGS

    values = {**TrainConfig.from_preset(preset).to_dict(), **overrides}
    return [values[n] for n in MAIN_SETTINGS + MORE_SETTINGS]


# -- limits ------------------------------------------------------------------------------------------


def test_limits_hold_on_the_server_not_only_in_the_page(client, server, tmp_path):
    from gradio_client import handle_file

    files = []
    for i in range(MAX_FILES + 1):
        f = tmp_path / f"part{i}.txt"
        f.write_text(SAMPLE.read_text())
        files.append(handle_file(str(f)))
    message = refused(client, files, "", False, [], "default", api_name="/convert")
    assert f"limit of {MAX_FILES}" in message or f"at most {MAX_FILES}" in message

    # the upload route itself refuses a file over max_file_size
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"messages": []}\n' * (MAX_UPLOAD_MB * 2**20 // 16 + 10))
    boundary = "tunerboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "/gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)  # noqa: S310
    assert info.value.code == 413

    # generation length is bounded server-side too (the slider's maximum is only a hint to a browser)
    message = refused(client, "hi", "", False, MAX_NEW_TOKENS + 1, 0.0, 0.9, 0, 1.1, api_name="/chat")
    assert str(MAX_NEW_TOKENS) in message


# -- security: run ids, files, tokens ---------------------------------------------------------------

PROBES = [
    "../../etc/passwd",
    "/etc/passwd",
    "../decoy",
    "..%2Fdecoy",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "%2E%2E%2F%2E%2E%2FETC%2FPASSWD",
    "..\\..\\etc\\passwd",
    "....//....//etc/passwd",
    "runs/../../decoy",
    "stale-run/../../decoy",
    ".",
    "..",
    "~/.ssh/id_rsa",
    "stale-run\x00../../decoy",
]

# endpoint -> the arguments around the run id (None marks where the probe goes)
RUN_ID_ENDPOINTS = {
    "/status": [None],
    "/cancel": [None],
    "/resume": [None],
    "/run_details": [None],
    "/saved_evaluation": [None],
    "/download_adapter": [None],
    "/download_merged": [None],
    "/push": [None, "someone/model", USER_TOKEN, False, True],
    "/delete": [None],
    "/publish": [None, "title", False, "someone/space", USER_TOKEN],
    "/evaluate": [None, 3, 8, 0.0, 0.9, 0, 1.1],
    "/chat": ["hello", None, False, 8, 0.0, 0.9, 0, 1.1],
}


@pytest.mark.parametrize("endpoint", list(RUN_ID_ENDPOINTS))
def test_run_id_traversal_probes_are_refused_by_every_endpoint(client, server, home, decoy, endpoint):
    for probe in PROBES + [str(decoy), str(home / "runs" / ".." / "decoy")]:
        args = [probe if a is None else a for a in RUN_ID_ENDPOINTS[endpoint]]
        message = refused(client, *args, api_name=endpoint)
        assert "not a valid run id" in message or "no run named" in message.lower(), (endpoint, probe, message)
        assert not any(m in message for m in PASSWD_MARKERS)
        assert "DECOY-SECRET" not in message and "Traceback" not in message
    assert (decoy / "secret.txt").read_text() == "DECOY-SECRET"  # /delete and friends touched nothing


def test_file_route_serves_nothing_outside_gradio_and_the_samples(server, home):
    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{server.url}/gradio_api/file={path}", timeout=10) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    # positive control: the public sample exports are served (so a refusal below is the route's decision)
    status, body = get(urllib.parse.quote(str(SAMPLE)))
    assert status == 200 and body.startswith(b"=== Ticket")

    secret = home / "runs" / "stale-run" / "config.yaml"
    upload = next((home / "uploads").rglob("*.txt"), None) or secret
    probes = ["/etc/passwd", "../../../../../../etc/passwd", "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
              "%2Fetc%2Fpasswd", "/ETC/PASSWD", "/etc/./passwd", "//etc//passwd",
              str(SAMPLE.parent / ".." / "app.py"), urllib.parse.quote(str(SAMPLE.parent / ".." / "app.py")),
              str(ROOT / "app.py"), str(secret), str(upload), str(upload).upper(), str(home / "decoy" / "secret.txt"),
              "file:///etc/passwd", "http://127.0.0.1:1/x", "http://169.254.169.254/latest/meta-data/"]
    for probe in probes:
        status, body = get(probe)
        assert status in (403, 404), (probe, status)
        assert not any(m.encode() in body for m in PASSWD_MARKERS), probe
        assert b"DECOY-SECRET" not in body and b"build_demo" not in body and b"base_model" not in body, probe


def test_push_needs_the_visitors_token_and_never_echoes_it(client, server, home, signoff_run):
    run_id = signoff_run.name
    # no token given: refused, even though the server has HF_TOKEN in its environment
    message = refused(client, run_id, "someone/model", "", False, True, api_name="/push")
    assert "token" in message.lower() and ENV_TOKEN not in message
    # a token given: the push fails offline, and the message does not contain the token
    message = refused(client, run_id, "someone/model", USER_TOKEN, False, True, api_name="/push")
    assert "Could not push to someone/model" in message  # it got as far as the Hub call
    assert USER_TOKEN not in message and "Traceback" not in message
    # ... nor does anything on disk or in the server's log
    assert USER_TOKEN not in server.log() and ENV_TOKEN not in server.log()
    for path in home.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20:
            data = path.read_bytes()
            assert USER_TOKEN.encode() not in data and ENV_TOKEN.encode() not in data, path


def test_a_finished_run_is_evaluated_described_and_downloaded(client, signoff_run):
    import zipfile

    run_id = signoff_run.name
    details = client.predict(run_id, api_name="/run_details")
    assert "| status | completed |" in details and "| learning rate |" in details
    verdict, metrics, rows, memorised = client.predict(run_id, 3, 8, 0.0, 0.9, 0, 1.1, api_name="/evaluate")
    from tuner.evaluate import METRIC_LABELS, saved_result

    names = [r[0] for r in metrics["data"]]  # named in words on the page
    assert {METRIC_LABELS[k] for k in ("habit", "chrf", "degenerate", "seconds_per_reply", "validation_loss",
                                       "general_perplexity")} <= set(names)
    assert metrics["headers"][1:4] == ["base + brand brief", "base + retrieved examples", "tuned"]
    assert all(r[-1] for r in metrics["data"])  # every metric explains itself in one line
    assert len(rows["data"]) == 3 and all(r[2] and r[3] and r[4] for r in rows["data"])  # each way answered each
    # which way to ship, in the evaluation's own sentence (no raw JSON on the page)
    shown = verdict.replace("\\", "")  # Markdown escapes, as the page renders them
    assert saved_result(signoff_run)["three_way"]["sentence"] in shown and "{" not in shown
    # what it memorised, in a sentence with its numbers (this run's data has no planted canaries)
    assert "of 3 replies" in memorised and "no canaries planted" in memorised
    # the evaluation is kept with the run and shown again when the run is picked
    assert client.predict(run_id, api_name="/saved_evaluation")[1]["data"] == metrics["data"]
    for endpoint, must_have in (("/download_adapter", "adapter_model.safetensors"),
                                ("/download_merged", "model.safetensors")):
        file = client.predict(run_id, api_name=endpoint)
        with zipfile.ZipFile(file["path"]) as zf:
            names = zf.namelist()
        assert any(n.endswith(must_have) for n in names), names
        assert any(n.endswith("README.md") for n in names)  # the model card travels with the weights


def test_publishing_says_what_the_card_says_about_personal_data(client, home, signoff_run):
    import shutil
    import zipfile

    from conftest import signoff_conversations
    from signoff_run import with_converted_pii

    run = with_converted_pii(signoff_run, home / "runs" / "pii-kept", signoff_conversations(16), redact=False)
    try:
        message, file, _ = client.predict(run.name, "Lumen help", False, "", "", api_name="/publish")
        said = "Personal data NOT redacted: the converter found 1 e-mail address in the conversations and left it"
        assert said in message  # on the page, before anyone uploads the Space ...
        with zipfile.ZipFile(file["path"]) as zf:
            readme = next(n for n in zf.namelist() if n.endswith("-space/README.md"))
            assert said in zf.read(readme).decode()  # ... and in the card it publishes
    finally:
        shutil.rmtree(run)  # the session's other tests see the runs they made


def test_restart_marks_a_stale_running_run_interrupted(client, server):
    progress, *_ = client.predict(server.stale_run, api_name="/status")
    assert 'data-status="interrupted"' in progress


# -- training jobs and the playground under load --------------------------------------------------------


def _status(client, run_id: str) -> str:
    progress, *_ = client.predict(run_id, api_name="/status")
    match = re.search(r'data-status="(\w+)"', progress)
    return match.group(1) if match else progress


def _wait_status(client, run_id: str, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = _status(client, run_id)
        if state in wanted or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def test_one_job_per_machine_a_second_start_queues_and_twenty_chats_while_it_trains(server, home, signoff_run):
    alice, bob = api_client(server), api_client(server)
    _convert(alice)
    _convert(bob)
    run_id = alice.predict("default", "quick", *_quick_settings(max_steps=500, quantization="none"), api_name="/train")
    assert re.fullmatch(r"run-[\w.-]+", run_id)
    try:
        assert _wait_status(alice, run_id, ("running",), timeout=180) == "running"
        # a second job waits in the machine's queue (issue 23): no error; its view says its place and who is
        # ahead, the queue lists both, the Runs list says "queued (1st in line)"; its owner cancels it
        second = bob.predict("default", "quick", *_quick_settings(), api_name="/train")
        progress, *_ = bob.predict(second, api_name="/status")
        assert 'data-status="queued"' in progress and f"Queued: 1st in line behind run {run_id} (training" in progress
        words, table = bob.predict(api_name="/queue")
        assert "**Training now:** run" in words and "1 run waits in line" in words
        table = table.get("value", table)  # the table, shown (an update that makes it visible)
        assert [row[:2] for row in table["data"]] == [["training", run_id], ["1st", second]]
        assert [second, "queued (1st in line)"] in [row[:2] for row in alice.predict(api_name="/runs")[0]["data"]]
        bob.predict(second, api_name="/cancel")
        assert _status(bob, second) == "cancelled" and _status(alice, run_id) == "running"
        bob.predict(second, api_name="/delete")

        # the playground keeps answering while the job trains: 20 sessions chat with base and tuned at once
        results: dict[int, tuple[float, list, list]] = {}
        errors: list[BaseException] = []

        def chat(i: int) -> None:
            try:
                started = time.monotonic()
                out = api_client(server).predict(f"Question number {i}: is my kettle on its way?", signoff_run.name,
                                              False, 8, 0.0, 0.9, 0, 1.1, api_name="/chat")
                results[i] = (time.monotonic() - started, out[1], out[2])
            except BaseException as exc:  # collected, re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        assert len(results) == 20
        for i, (_seconds, base_chat, tuned_chat) in results.items():
            # each session sees its own question and one reply per column, nobody else's
            for column in (base_chat, tuned_chat):
                assert [m["role"] for m in column] == ["user", "assistant"]
                assert _text(column[0]) == f"Question number {i}: is my kettle on its way?"
                assert _text(column[1]).strip()
        latencies = sorted(s for s, _, _ in results.values())
        print(f"20 chats while training: median {latencies[10]:.1f} s, slowest {latencies[-1]:.1f} s")
        assert _status(alice, run_id) == "running"  # and the job kept going
    finally:
        alice.predict(run_id, api_name="/cancel")
    assert _wait_status(alice, run_id, ("cancelled",), timeout=60) == "cancelled"
    # a cancelled run resumes from its last checkpoint (here: the start), and can be cancelled again
    alice.predict(run_id, api_name="/resume")
    assert _wait_status(alice, run_id, ("running", "queued"), timeout=30) in ("running", "queued")
    alice.predict(run_id, api_name="/cancel")
    assert _wait_status(alice, run_id, ("cancelled",), timeout=60) == "cancelled"
    alice.predict(run_id, api_name="/delete")
    assert run_id not in json.dumps(alice.predict(api_name="/runs")[0])
    assert not (home / "runs" / run_id).exists()  # data copy, checkpoints, log: gone from disk


# -- self-hosting and Spaces ------------------------------------------------------------------------------


def test_tuner_auth_puts_the_page_and_the_api_behind_a_password(tmp_path):
    from gradio_client import Client

    with running_app(tmp_path / "home", tmp_path / "app.log", env={"TUNER_AUTH": "crew:s3cret-pass"}) as srv:
        for path in ("/gradio_api/info", f"/gradio_api/file={SAMPLE}"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(srv.url + path, timeout=10)  # noqa: S310
            assert info.value.code in (401, 403)
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises its own auth errors)
            Client(srv.url, verbose=False, auth=("crew", "wrong"))
        client = Client(srv.url, verbose=False, auth=("crew", "s3cret-pass"), download_files=False)
        assert client.predict(api_name="/runs")[0]["data"] == []
        assert client.predict(api_name="/load")[-1] == "crew"  # judgements are signed with the login's name
        assert "s3cret-pass" not in srv.log()


def test_a_space_without_persistent_storage_says_runs_are_temporary(monkeypatch):
    from tuner.ui import page as app

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("TUNER_AUTH", raising=False)
    assert app.storage_notice() == ""  # running locally: nothing to warn about
    monkeypatch.setenv("SPACE_ID", "someone/tuner")
    monkeypatch.setattr(app, "persistent_storage", lambda: False)
    assert "no persistent storage" in app.storage_notice()
    assert "shared" in app.storage_notice()  # a public Space's visitors see each other's runs: say so
    monkeypatch.setattr(app, "persistent_storage", lambda: True)
    monkeypatch.setenv("TUNER_AUTH", "crew:s3cret-pass")
    assert app.storage_notice() == ""  # persistent, and behind a login: nothing to warn about
