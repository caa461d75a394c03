"""Shared fixtures. Every test session gets its own TUNER_HOME (runs, uploads) but shares the
converted default model in ~/.cache/tuner/models, so the GGUF conversion happens once a machine."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "datasets"

os.environ.setdefault("TUNER_MODELS_DIR", str(Path.home() / ".cache" / "tuner" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads sleep instead of spin while waiting: on 2 shared cores spinning stalls every model test
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


DEFAULT_SHAPE = (576, 1536, 192)  # SmolLM2-135M: hidden, intermediate, key/value width
_PROBE: dict = {}


def _machine_lines() -> list[str]:
    """The CPU and the precision the product chooses on it (measured once a session, as `precision: auto` does)."""
    import torch

    from tuner.precision import cpu_info, describe, probe

    cpu = cpu_info()
    lines = [f"cpu: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags']) or 'none of interest'}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}; training precision: "
                     f"{'bf16' if torch.cuda.is_bf16_supported() else 'fp16'}")
    else:
        if not _PROBE:
            _PROBE.update(probe(*DEFAULT_SHAPE))
        lines.append(f"training precision (precision: auto) on this CPU: {describe(_PROBE)}")
    return lines


def pytest_report_header(config):
    return _machine_lines()


def pytest_terminal_summary(terminalreporter):
    # also under -q (which hides the header): a failure on another machine explains itself
    terminalreporter.write_sep("-", "this machine")
    for line in _machine_lines():
        terminalreporter.write_line(line)


def train_watched(run: Path, look: Callable[[], bool], every: float = 0.05) -> dict[str, Any]:
    """Train `run` in this process while `look()` runs every `every` seconds in a thread, as someone watching
    the run folder would, until it returns True or training ends; the run's final status."""
    from tuner import train

    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not look():
            time.sleep(every)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        return train.train_run(run)
    finally:
        done.set()
        watcher.join()


HOLDER = """
import os, sys, time
from tuner.runs import take_machine_lock
fd = take_machine_lock("")
os.ftruncate(fd, 0)
os.pwrite(fd, f"run {sys.argv[1]}, pid {os.getpid()}".encode(), 0)
print("holding", flush=True)
time.sleep(600)
"""


def hold_machine_lock(run_id: str, home: Path | None = None):
    """A real process holding TUNER_HOME's training lock as a job does, naming `run_id` as the holder: another
    user's job, without training. Started in its own session (os.killpg ends it); returns once it holds."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"TUNER_HOME": str(home)} if home else {})}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_id], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


@pytest.fixture(autouse=True, scope="session")
def _tuner_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("tuner_home")
    old = os.environ.get("TUNER_HOME")
    os.environ["TUNER_HOME"] = str(home)
    import torch

    if not torch.cuda.is_available():  # one probe a session: what the summary prints is what runs use
        from tuner.precision import remember

        _machine_lines()
        remember(DEFAULT_SHAPE, dict(_PROBE))
    yield home
    if old is None:
        os.environ.pop("TUNER_HOME", None)
    else:
        os.environ["TUNER_HOME"] = old


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from tuner.models import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from tuner.models import load_tokenizer

    return load_tokenizer("default")


SIGN_OFF = "Stay sunny, the Lumen Lamps team."
TOPICS = ["my lamp flickers", "where is my order", "can I return a bulb", "the app will not pair",
          "how bright is the Halo", "do you ship to Spain", "my warranty card is lost", "the dimmer hums",
          "what colour is Ember", "is the Nova waterproof", "the cable is too short", "I got the wrong shade"]


def signoff_conversations(n: int, seed: int = 0) -> list[dict]:
    """Short support chats whose replies all end with one distinctive sign-off."""
    import random

    rng = random.Random(seed)
    topics = TOPICS
    answers = ["Let's fix that together: unplug it for ten seconds, then try again.",
               "Happy to help! Your parcel left our workshop today.",
               "Of course, returns are free for thirty days.",
               "Thanks for asking! Open Settings, then Pair, and hold the button.",
               "Great question, it gives a warm 800 lumens."]
    out = []
    for i in range(n):
        topic = topics[(i + rng.randrange(len(topics))) % len(topics)]
        reply = f"{answers[rng.randrange(len(answers))]} {SIGN_OFF}"
        out.append({"messages": [{"role": "user", "content": f"Hi, {topic} (case {i})."},
                                 {"role": "assistant", "content": reply}]})
    return out


@pytest.fixture
def signoff_data(tmp_path) -> Path:
    """A converted-data folder (train.jsonl, validation.jsonl) with a distinctive sign-off."""
    d = tmp_path / "data"
    d.mkdir()
    rows = signoff_conversations(48)
    for name, part in (("train.jsonl", rows[:40]), ("validation.jsonl", rows[40:])):
        with open(d / name, "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
    return d


@pytest.fixture(scope="session")
def signoff_run(default_model_path) -> Path:
    """A completed run (under runs_dir()) trained on `signoff_conversations`; shared by the
    playground, evaluate and export tests, so it trains once a session."""
    from signoff_run import make_signoff_run

    from tuner.paths import runs_dir

    return make_signoff_run(runs_dir() / "signoff-run", signoff_conversations(48))


@pytest.fixture(scope="session")
def preference_parent(signoff_run) -> Path:
    """The signoff run's copy that preference tests give judgements to (tests/preference_pairs.py)."""
    from preference_pairs import preference_parent

    return preference_parent(signoff_run)


@pytest.fixture(scope="session")
def dpo_child(preference_parent) -> tuple[Path, dict]:
    """A DPO child of `preference_parent` trained through the CLI on 40 judgements, in the session's runs folder
    (so the page lists it): (its folder, the JSON line `train --json` printed). Trains once a session."""
    from preference_pairs import train_dpo_child

    from tuner.paths import runs_dir

    return train_dpo_child(preference_parent, runs_dir() / "dpo-child")
