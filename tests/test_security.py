"""What a stranger's input can never do: leave runs/, run code from a weight file or a model folder,
learn the Hugging Face token, or get past the server-side limits. Library level; the page's own
endpoints and Gradio's file route are probed in test_app.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

import pytest

from tuner import jobs, limits
from tuner.config import ConvertConfig, GenerationConfig, TrainConfig
from tuner.errors import ModelError, RunNotFound, TunerError
from tuner.paths import check_run_id, runs_dir, tuner_home
from tuner.runs import resolve

ROOT = Path(__file__).resolve().parent.parent

# run ids as a stranger would send them; none may name anything but a folder directly under runs/
PROBES = [
    "../../etc/passwd", "/etc/passwd", "../decoy", "..", ".", "", " ", "~/.ssh/id_rsa", "~root",
    "..%2Fdecoy", "..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/etc/passwd", "%2E%2E%2F%2E%2E%2FETC%2FPASSWD",
    "..\\..\\etc\\passwd", "....//....//etc/passwd", "runs/../../decoy", "decoy/..", "..;/decoy",
    "signoff-run/../../decoy", "signoff-run\x00../../decoy", "signoff-run\n", "signoff-run/",
    "\u2025/decoy", "\uff0e\uff0e\uff0fdecoy", "ＥＴＣ", "a" * 300,
]


@pytest.fixture(scope="module")
def decoy() -> Path:
    """A run-shaped folder next to runs/ (a completed run, with a secret): probes aim at it."""
    d = tuner_home() / "decoy"
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    TrainConfig.from_preset("quick").save(d / "config.yaml")
    (d / "status.json").write_text(json.dumps({"status": "completed", "adapter": "adapter"}))
    (d / "secret.txt").write_text("DECOY-SECRET")
    return d


def _untouched(decoy: Path) -> None:
    assert (decoy / "secret.txt").read_text() == "DECOY-SECRET"
    assert json.loads((decoy / "status.json").read_text())["status"] == "completed"


# -- run ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", PROBES, ids=repr)
def test_run_ids_from_strangers_never_leave_runs(probe, decoy):
    with pytest.raises(RunNotFound):
        check_run_id(probe)
    with pytest.raises(RunNotFound):
        jobs.delete_run(probe)  # the app's delete takes an id, never a path
    with pytest.raises(RunNotFound):
        resolve(probe)  # also takes a path (the CLI's --run DIR), but only to a folder holding a run
    _untouched(decoy)


def test_an_absolute_path_is_a_cli_path_and_never_an_id(decoy):
    # the CLI may name a run folder anywhere; the app's id-only functions never accept one
    assert resolve(str(decoy)).path == decoy.resolve()
    for id_only in (check_run_id, jobs.delete_run):
        with pytest.raises(RunNotFound):
            id_only(str(decoy))
    _untouched(decoy)


def test_every_run_taking_function_refuses_the_probes(decoy, tmp_path):
    from tuner.evaluate import evaluate
    from tuner.export import export
    from tuner.playground import Playground, read_run
    from tuner.publish import publish

    calls = {
        "jobs.read_status": jobs.read_status, "jobs.read_metrics": jobs.read_metrics, "jobs.cancel": jobs.cancel,
        "jobs.start": jobs.start, "jobs.delete_run": jobs.delete_run, "playground.read_run": read_run,
        "Playground.load_run": Playground(device="cpu").load_run, "evaluate": evaluate,
        "export": lambda run: export(run, tmp_path / "export"), "publish": lambda run: publish(run, tmp_path / "space"),
    }
    wrong = []
    for name, call in calls.items():
        for probe in PROBES:
            try:
                call(probe)
                wrong.append((name, probe[:40], "accepted"))
            except TunerError:
                pass
            except Exception as exc:  # an OS error or a crash is not a refusal the app can show
                wrong.append((name, probe[:40], f"{type(exc).__name__}: {str(exc)[:80]}"))
        _untouched(decoy)
    assert wrong == []
    assert not (tmp_path / "export").exists() and not (tmp_path / "space").exists()


def test_a_status_file_cannot_point_the_loader_outside_its_run(decoy, tmp_path):
    from tuner.playground import read_run

    run = runs_dir() / "points-outside"
    (run / "data").mkdir(parents=True, exist_ok=True)
    TrainConfig.from_preset("quick").save(run / "config.yaml")
    for adapter in (str(decoy / "adapter"), "../../decoy/adapter", "adapter/../../../decoy/adapter"):
        (run / "status.json").write_text(json.dumps({"status": "completed", "adapter": adapter}))
        with pytest.raises(ModelError, match="inside the run"):
            read_run(run.name)
    shutil.rmtree(run)


# -- pickles and remote code ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded (and could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Payload(marker)})


def test_pickle_uploads_are_refused_and_never_unpickled(tmp_path, tokenizer):
    from tuner.dataset import convert

    marker = tmp_path / "UNPICKLED"
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("train.jsonl", "w") as fh:
        for _ in range(256):  # 256 MB of zeros in ~250 KB
            fh.write(b"\0" * 2**20)
    files = {"model.bin": _pickle(marker), "adapter.pt": _pickle(marker), "data.pkl": _pickle(marker),
             "weights.pth": _pickle(marker), "chats.jsonl": _pickle(marker), "export.zip": bomb.getvalue(),
             "export.jsonl.zip": bomb.getvalue(), "logs.jsonl": bomb.getvalue()}
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                     {"role": "assistant", "content": f"Hello {i}!"}]}) + "\n"
                            for i in range(12)))
    paths = [good]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    began = time.monotonic()
    report = convert(paths, tmp_path / "out", ConvertConfig(max_length=128), tokenizer=tokenizer)
    seconds = time.monotonic() - began
    by_file = {f["file"]: f for f in report["files"]}
    for name in files:
        assert by_file[name]["conversations_kept"] == 0 and by_file[name].get("error"), by_file[name]
    assert "zip" in by_file["logs.jsonl"]["error"]  # named for what it is, not unpacked
    assert by_file["good.jsonl"]["conversations_kept"] == 12 and report["ok"]
    assert not marker.exists()
    assert seconds < 60, f"refusing the archives took {seconds:.0f} s: were they unpacked?"


def _model_folder(folder: Path, marker: Path) -> Path:
    """A base-model folder whose only weights are a pickle, next to the real tokenizer and config."""
    from tuner.models import default_checkpoint

    folder.mkdir(parents=True)
    for item in default_checkpoint().iterdir():
        if item.suffix != ".safetensors":
            shutil.copy2(item, folder / item.name)
    (folder / "pytorch_model.bin").write_bytes(_pickle(marker))
    return folder


def test_pickle_models_and_adapters_are_refused_and_never_unpickled(tmp_path, default_model_path):
    from tuner import runs, train
    from tuner.export import export
    from tuner.models import load_model, load_tokenizer
    from tuner.playground import Playground
    from tuner.publish import publish

    marker = tmp_path / "UNPICKLED"
    base = _model_folder(tmp_path / "pickled-base", marker)
    with pytest.raises(ModelError, match="safetensors"):
        load_model(str(base))
    with pytest.raises(ModelError, match="safetensors"):
        load_tokenizer(str(base))
    # training on it fails before anything is read
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "ahoy"}]}) + "\n")
    run = runs.prepare_run(TrainConfig.from_preset("quick", base_model=str(base), quantization="none"), data,
                            run_dir=runs_dir() / "pickled-base-run")
    status = train.train_run(run)
    assert status["status"] == "failed" and "safetensors" in status["error"]

    # a "completed" run whose adapter is a pickle
    run = runs_dir() / "pickled-adapter-run"
    (run / "adapter").mkdir(parents=True)
    TrainConfig.from_preset("quick").save(run / "config.yaml")
    (run / "status.json").write_text(json.dumps({"status": "completed", "adapter": "adapter"}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (run / "adapter" / "adapter_model.bin").write_bytes(_pickle(marker))
    for load in (Playground(device="cpu").load_run, lambda r: export(r, tmp_path / "export"),
                 lambda r: publish(r, tmp_path / "space")):
        with pytest.raises(ModelError, match="safetensors"):
            load(run.name)
    assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "space").exists()


def test_training_args_pickle_beside_an_adapter_is_never_loaded_nor_shipped(signoff_run, tmp_path):
    from tuner.export import export
    from tuner.playground import read_run

    marker = tmp_path / "UNPICKLED"
    run = runs_dir() / "planted-training-args"
    shutil.copytree(signoff_run, run)
    info = read_run(run.name)
    (info.adapter_dir / "training_args.bin").write_bytes(_pickle(marker))  # Trainer writes one here
    out = export(run.name, tmp_path / "export")
    assert not list(Path(out).rglob("*.bin")) and (Path(out) / "adapter_model.safetensors").is_file()
    assert not marker.exists()
    shutil.rmtree(run)


def test_trust_remote_code_is_never_enabled():
    # every place the product passes it (a keyword or a kwargs dict) passes the literal False
    sources = sorted((ROOT / "tuner").rglob("*.py")) + [ROOT / "app.py"]
    passed = re.compile(r"""trust_remote_code\s*=(?!=)\s*([^,)\s]+)|["']trust_remote_code["']\s*:\s*([^,}\s]+)""")
    values = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in passed.finditer(line.split("#")[0]):
                values.append((f"{path.name}:{number}", match.group(1) or match.group(2)))
    assert len(values) >= 3  # models.load_model, models.load_tokenizer, export's merge
    assert [v for v in values if v[1] != "False"] == []


def test_custom_code_in_a_model_folder_never_runs(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tuner.models import load_model, load_tokenizer

    marker = tmp_path / "CUSTOM-CODE-RAN"
    folder = tmp_path / "custom"
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evilmodel'\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilmodel", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.T", None]}}))
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    # refused with tuner's own error (the app shows it as a plain message), and the code never ran
    with pytest.raises(ModelError):
        load_model(str(folder))
    with pytest.raises(ModelError):
        load_tokenizer(str(folder))
    assert not marker.exists()


# -- the Hugging Face token ------------------------------------------------------------------------------


def test_token_never_in_a_failed_push_traceback_log_or_file(signoff_run, tmp_path, caplog, capsys):
    import logging

    from tuner.export import export

    token = "hf_" + secrets.token_hex(17)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunerError) as info:  # offline (HF_HUB_OFFLINE=1): the push fails
        export(signoff_run, tmp_path / "pushed", push_to="someone/lamp-voice", token=token)
    # the whole chain a crash reporter or a log would print, causes included
    text = "".join(traceback.format_exception(info.value))
    cause = info.value.__cause__ or info.value.__context__
    while cause is not None:
        text += repr(cause) + str(getattr(cause, "args", ""))
        cause = cause.__cause__ or cause.__context__
    assert token not in text
    assert token not in caplog.text and token not in "".join(capsys.readouterr())
    for folder in (tmp_path, signoff_run, tuner_home()):
        leaks = [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 2**26 and
                 token.encode() in p.read_bytes()]
        assert leaks == []


# -- limits ------------------------------------------------------------------------------------------------


def test_server_side_limits_hold_in_the_library(tmp_path, tokenizer, monkeypatch):
    from tuner.dataset import convert
    from tuner.formats import check_size

    with pytest.raises(TunerError, match=str(limits.MAX_EXAMPLE_TOKENS)):
        TrainConfig(max_length=limits.MAX_EXAMPLE_TOKENS + 1)  # tokens per example, for training
    with pytest.raises(TunerError, match=str(limits.MAX_EXAMPLE_TOKENS)):
        convert([tmp_path / "x.jsonl"], tmp_path / "out", ConvertConfig(max_length=limits.MAX_EXAMPLE_TOKENS + 1),
                tokenizer=tokenizer)
    with pytest.raises(TunerError, match=str(limits.MAX_NEW_TOKENS)):
        GenerationConfig(max_new_tokens=limits.MAX_NEW_TOKENS + 1)  # max new tokens, in every column
    low = subprocess.run([sys.executable, "-c", "from tuner.config import GenerationConfig as G; print(G().max_new_tokens)"],
                         env={**os.environ, "TUNER_MAX_NEW_TOKENS": "64"}, capture_output=True, text=True, cwd=ROOT)
    assert low.stdout.strip() == "64", low.stderr  # a server with a lower limit still has working defaults
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 2**20)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"{}\n" * 2**19)
    with pytest.raises(TunerError, match="limit is 1 MB"):
        check_size(big)
    monkeypatch.setattr(limits, "MAX_FILES", 2)
    with pytest.raises(TunerError, match="at most 2"):
        convert([big, big, big], tmp_path / "out", tokenizer=tokenizer)
    # total conversations: test_dataset.py::test_conversation_limit_stops_reading_with_a_report


# -- restart ---------------------------------------------------------------------------------------------


def test_a_restart_removes_uploads_of_sessions_that_ended_with_the_old_process(tmp_path):
    # Gradio calls the app's delete_callback only for sessions of the live process (and not for
    # sessions evicted beyond its capacity): folders of an earlier process must go at start
    from app_server import running_app

    home = tmp_path / "home"
    left = home / "uploads" / secrets.token_hex(16)
    (left / "files").mkdir(parents=True)
    (left / "files" / "customers.jsonl").write_text('{"messages": [{"role": "user", "content": "my card 4111"}]}\n')
    with running_app(home, tmp_path / "app.log"):
        assert not left.exists(), "uploads from before the restart are still on disk"


def test_reliability_section_cites_tests_that_exist():
    """The README's "Reliability and data" promises each name the test that checks them; those must exist."""
    readme = (ROOT / "README.md").read_text()
    heading = "## Reliability and data"
    text = readme if heading in readme else (ROOT / "docs" / "RELIABILITY.md").read_text()
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", len(heading))] if "\n## " in section[len(heading):] else section
    cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(cited) >= 20
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} does not exist"
    assert "TUNER_AUTH=user:password" in section
