"""Publishing a run as a standalone chat Space: the folder, its app (run for real), the push, the zip."""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import SIGN_OFF, signoff_conversations
from signoff_run import ADDRESS, copy_run, with_converted_pii

from tuner.errors import TunerError
from tuner.publish import CONFIG_FILE, PushFailed, add_cli_arguments, cli, publish, zip_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_tunerTestFakeToken0123456789abcdef"
PROMPT = "Hi, my lamp flickers (case 7)."


@pytest.fixture(scope="module")
def space(signoff_run, tmp_path_factory) -> dict:
    return publish(signoff_run, tmp_path_factory.mktemp("publish") / "space", title="Lumen Lamps help")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "NO_PROXY": "127.0.0.1,localhost", **extra}
    env.pop("HF_TOKEN", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the published app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/gradio_api/info", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the published app did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- the folder ----------------------------------------------------------------------------------


def test_folder_holds_app_weights_requirements_and_card(space, signoff_run):
    folder = Path(space["folder"])
    assert {"app.py", "requirements.txt", "README.md", CONFIG_FILE} <= set(space["files"])
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    # the embedded base travels as its GGUF file, not as a 540 MB fp32 copy
    assert list((folder / "base").glob("*.gguf")) and space["size_bytes"] < 150e6
    assert "import tuner" not in (folder / "app.py").read_text() and "from tuner" not in (folder / "app.py").read_text()

    reqs = {re.split(r"[<>=]", line)[0] for line in (folder / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    assert reqs == {"gradio", "torch", "transformers", "safetensors", "peft", "gguf"}

    readme = (folder / "README.md").read_text()
    meta = readme.split("---")[1]
    assert readme.startswith("---\n")
    assert re.search(r"^sdk: gradio$", meta, re.M) and re.search(r"^app_file: app.py$", meta, re.M)
    assert re.search(rf"^sdk_version: {re.escape(version('gradio'))}$", meta, re.M)
    card = readme.split("---", 2)[2]
    assert "SmolLM2-135M-Instruct" in card and "GGUF" in card  # base model and how it is shipped
    n_train = len(_rows(signoff_run / "data" / "train.jsonl"))
    n_val = len(_rows(signoff_run / "data" / "validation.jsonl"))
    assert f"| Training conversations | {n_train} |" in card and f"| Validation conversations | {n_val} |" in card
    assert "| learning_rate |" in card

    # nothing in the folder reveals this machine's layout (runs, model cache, checkout)
    local = (os.environ["TUNER_HOME"], os.environ["TUNER_MODELS_DIR"], str(ROOT))
    texts = [p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".gguf", ".safetensors")]
    assert [p.name for p in texts if any(x in p.read_text(errors="replace") for x in local)] == []

    settings = json.loads((folder / CONFIG_FILE).read_text())
    val_prompts = [row["messages"][0]["content"] for row in _rows(signoff_run / "data" / "validation.jsonl")]
    assert settings["examples"] and set(settings["examples"]) <= set(val_prompts)
    assert settings["title"] == "Lumen Lamps help"
    assert settings["generation"]["temperature"] == 0  # greedy by default, like `tuner chat`


def test_card_shows_evaluation_figures_when_the_run_has_them(signoff_run, tmp_path):
    run = copy_run(signoff_run, tmp_path / "run-with-eval")
    metric = {"explain": "Share of replies using the brand's sign-off.", "base": 0.0, "tuned": 0.875, "reference": 1.0}
    (run / "eval.json").write_text(json.dumps({"run": run.name, "rows": [], "metrics": {"brand_phrase_rate": metric}}))
    readme = (Path(publish(run, tmp_path / "space")["folder"]) / "README.md").read_text()
    assert "Evaluation (base vs tuned)" in readme and "| brand_phrase_rate | 0 | 0.875 |" in readme
    # a three-way evaluation: which way to ship, then each way's numbers
    habit = {"explain": "Replies that carry the agents' habit.", "base": {"count": 3, "of": 24},
             "retrieved": {"count": 18, "of": 24}, "tuned": {"count": 23, "of": 24}}
    sentence = "Ship the tuned model: it carries the sign-off on 23 of 24 new questions (retrieval, without training: 18)"
    (run / "eval.json").write_text(json.dumps({"run": run.name, "rows": [{}] * 24, "metrics": {"habit": habit},
                                               "three_way": {"k": 3, "sentence": sentence}}))
    readme = (Path(publish(run, tmp_path / "space2")["folder"]) / "README.md").read_text()
    assert f"**{sentence}.** On 24 held-out questions" in readme
    assert "| metric | base + brand brief | retrieved examples | tuned | meaning |" in readme
    assert "| habit | 3 of 24 | 18 of 24 | 23 of 24 |" in readme


def test_card_says_personal_data_was_redacted_only_when_it_was(space, signoff_run, tmp_path):
    from tuner.runs import Run

    def data_text(run: Path) -> str:
        return "".join((run / "data" / name).read_text() for name in ("train.jsonl", "validation.jsonl"))

    kept = with_converted_pii(signoff_run, tmp_path / "run-kept", signoff_conversations(16), redact=False)
    result = publish(kept, tmp_path / "space-kept")
    card = (Path(result["folder"]) / "README.md").read_text()
    assert ADDRESS in data_text(kept)  # the data the model learned from still holds the address ...
    said = ("Personal data NOT redacted: the converter found 1 e-mail address in the conversations and left it as "
            "written.")
    assert said in card and said in result["personal_data"]  # ... and the card says so, as the page does
    assert "redacted:" not in card.replace("NOT redacted:", "") and "PII" not in card
    assert card.count("Personal data") == 1  # said once, by the model card's Data section
    assert not [p for p in Path(result["folder"]).rglob("*.jsonl")]  # "not part of this folder": the data is not
    n_train = len(_rows(kept / "data" / "train.jsonl"))
    assert f"Trained on {n_train} conversations" in card and f"| Training conversations | {n_train} |" in card

    redacted = with_converted_pii(signoff_run, tmp_path / "run-redacted", signoff_conversations(16), redact=True)
    card = (Path(publish(redacted, tmp_path / "space-redacted")["folder"]) / "README.md").read_text()
    assert ADDRESS not in data_text(redacted) and "[EMAIL]" in data_text(redacted)
    assert ("Personal data redacted: the converter replaced 1 e-mail address with placeholders such as [EMAIL] "
            "before training.") in card and "NOT redacted" not in card

    # data that never went through the converter was never scanned, and nothing says otherwise
    assert not Run(signoff_run).data_file("report.json").exists()
    assert "Personal data not checked" in (Path(space["folder"]) / "README.md").read_text()
    assert "Personal data not checked" in (Run(signoff_run).result_dir() / "README.md").read_text()  # the run's card


def test_system_prompt_comes_from_the_data_unless_given(signoff_run, tmp_path):
    run = copy_run(signoff_run, tmp_path / "run-with-system")
    brief = "You are Lumi, the cheerful helper of Lumen Lamps."
    rows = _rows(run / "data" / "train.jsonl")
    with open(run / "data" / "train.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps({"messages": [{"role": "system", "content": brief}, *row["messages"]]}) + "\n")
    folder = Path(publish(run, tmp_path / "a")["folder"])
    assert json.loads((folder / CONFIG_FILE).read_text())["system_prompt"] == brief
    assert brief in (folder / "README.md").read_text()
    folder = Path(publish(run, tmp_path / "b", system_prompt="Be brief.")["folder"])
    assert json.loads((folder / CONFIG_FILE).read_text())["system_prompt"] == "Be brief."


def test_refuses_unfinished_runs_and_foreign_folders(signoff_run, tmp_path):
    run = copy_run(signoff_run, tmp_path / "run-failed")
    (run / "status.json").write_text(json.dumps({"status": "failed", "error": "out of memory"}))
    with pytest.raises(TunerError, match="not completed"):
        publish(run, tmp_path / "x")
    foreign = tmp_path / "my-documents"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TunerError, match="not empty"):
        publish(signoff_run, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(TunerError, match="Space id"):
        publish(signoff_run, tmp_path / "y", push_to="not a space id")


def test_merged_folder_needs_neither_peft_nor_the_gguf_and_still_answers_in_the_voice(signoff_run, tmp_path):
    result = publish(signoff_run, tmp_path / "merged", merge=True)
    folder = Path(result["folder"])
    assert result["weights"] == "merged" and list((folder / "model").glob("*.safetensors"))
    assert not (folder / "adapter").exists() and not (folder / "base").exists()
    reqs = (folder / "requirements.txt").read_text()
    assert "peft" not in reqs and "gguf" not in reqs
    assert "merged" in (folder / "README.md").read_text()
    app = runpy.run_path(str(folder / "app.py"))  # loads the model exactly as the Space would
    *_, reply = app["respond"](PROMPT, [])
    assert SIGN_OFF.split(",")[0] in reply


def test_zip_holds_the_folder(space, tmp_path):
    archive = zip_folder(space["folder"], tmp_path / "space.zip")
    name = Path(space["folder"]).name
    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == sorted(f"{name}/{f}" for f in space["files"])


# -- the app, run for real -----------------------------------------------------------------------


def test_published_app_replies_like_tuner_chat(space, signoff_run, tmp_path):
    from gradio_client import Client

    folder = Path(space["folder"])
    port = _free_port()
    log = tmp_path / "space.log"
    # cwd is the published folder: `tuner` is not importable there, so the app must stand alone
    with open(log, "w") as fh:
        app = subprocess.Popen([sys.executable, "app.py"], cwd=folder, stdout=fh, stderr=subprocess.STDOUT,
                               env=_env(GRADIO_SERVER_PORT=str(port)), start_new_session=True)
    try:
        # the playground's answer, computed while the app starts (both load the model)
        chat = subprocess.run([sys.executable, "-m", "tuner", "chat", "--run", str(signoff_run), "--prompt", PROMPT,
                               "--json"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert chat.returncode == 0, chat.stderr[-3000:]
        replies = json.loads(chat.stdout)["replies"]
        url = f"http://127.0.0.1:{port}"
        _wait_for(url, app, log)
        reply = Client(url, verbose=False).predict(PROMPT, api_name="/chat")
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=30)
    assert reply == replies["tuned"]
    assert SIGN_OFF.split(",")[0] in reply  # the tuned voice (the run's sign-off): the adapter is on


# -- pushing -------------------------------------------------------------------------------------


def test_push_offline_fails_clearly_leaves_folder_ready_and_never_stores_the_token(signoff_run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "space"
    proc = subprocess.run([sys.executable, "-m", "tuner", "publish", "--run", str(signoff_run), "--to", str(folder),
                           "--push", "someone/lumen-bot", "--token", FAKE_TOKEN], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: Could not push to the Space someone/lumen-bot")
    assert "hf upload someone/lumen-bot" in proc.stderr and str(folder) in proc.stderr
    assert (folder / "app.py").is_file() and (folder / "adapter" / "adapter_model.safetensors").is_file()

    # the token from HF_TOKEN (the CLI reads it; the library never does), in-process this time
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--run", str(signoff_run), "--to", str(tmp_path / "space2"), "--push", "someone/lumen-bot"])
    with pytest.raises(PushFailed, match="Could not push") as info:
        cli(args)
    assert info.value.folder == tmp_path / "space2" and (tmp_path / "space2" / "app.py").is_file()
    out = capsys.readouterr()

    token = FAKE_TOKEN.encode()
    for root in (folder, tmp_path / "space2"):
        leaks = [p for p in root.rglob("*") if p.is_file() and token in p.read_bytes()]
        assert leaks == []
    assert FAKE_TOKEN not in proc.stdout + proc.stderr + out.out + out.err + str(info.value)


def test_push_without_token_says_how_and_ignores_the_servers_token(signoff_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # a server's own token is never used by the library
    with pytest.raises(PushFailed, match="No Hugging Face token") as info:
        publish(signoff_run, tmp_path / "space", push_to="someone/lumen-bot")
    assert info.value.command.startswith("hf repos create someone/lumen-bot --repo-type space")
