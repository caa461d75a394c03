"""Faults a training job meets in real life, proven against the real training process.

kill -9 at random moments and in the middle of a checkpoint or the final adapter save, a
restart that finds runs left "running", out of memory, a broken loss, a full disk, and the
playground under load while a job trains. The training process is the one `tuner.jobs` starts
for the app; faults at exact moments come from `sitecustomize.py` below, which that process
imports when the test puts it on PYTHONPATH (a real SIGKILL, a real address-space limit).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SIGN_OFF, signoff_conversations, train_watched

from tuner import jobs, runs, train
from tuner.config import GenerationConfig, TrainConfig
from tuner.errors import TrainingError, TunerError
from tuner.paths import runs_dir

SERVER_TOKEN = "hf_SERVERtokenRELIABILITY0000000000000"  # in the job's environment; must never reach a file
TIMEOUT = 900  # seconds; generous, the suite shares two cores
# small and fast: no validation split (no eval passes), a checkpoint every 2 steps
SMALL = {"max_steps": 4, "batch_size": 2, "max_length": 128, "quantization": "none", "eval_steps": 2,
         "save_steps": 2, "lora_r": 4, "lora_alpha": 8, "warmup_ratio": 0.0, "early_stopping_patience": 0,
         "eval_share": 1.0, "save_every_s": 0,  # every eval_steps / save_steps: the steps asserted below
         "voice_prompts": 0}  # no verdict asserted here: the voice check has its own tests

FAULT_HOOK = '''\
"""Fault injection for tests/test_reliability.py, imported by the training process it starts.

TUNER_TEST_FAULT=checkpoint:N  SIGKILL while checkpoint-N is written: its weights and optimizer
                               are on disk, trainer_state.json (written last) is not
TUNER_TEST_FAULT=final         SIGKILL while the final adapter is written: its weights are on
                               disk, the model card, the reload check and the rename are not
TUNER_TEST_FAULT=memory:MB     when training starts, cap the address space at MB above what the
                               process maps, as a machine without more memory would
"""
import os

FAULT = os.environ.get("TUNER_TEST_FAULT", "")
if FAULT:
    import signal

    kind, _, arg = FAULT.partition(":")
    if kind == "checkpoint":
        from transformers import trainer_callback

        _save_to_json = trainer_callback.TrainerState.save_to_json

        def save_to_json(self, json_path):
            if os.path.basename(os.path.dirname(json_path)) == "checkpoint-" + arg:
                os.kill(os.getpid(), signal.SIGKILL)
            return _save_to_json(self, json_path)

        trainer_callback.TrainerState.save_to_json = save_to_json
    elif kind == "final":
        from transformers import trainer

        _save_model = trainer.Trainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            _save_model(self, output_dir, _internal_call)
            if output_dir and os.path.basename(str(output_dir)) == ".adapter.tmp":
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.Trainer.save_model = save_model
    elif kind == "memory":
        import resource

        from transformers import trainer

        _train = trainer.Trainer.train

        def train(self, *args, **kwargs):
            with open("/proc/self/status") as fh:
                mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (mapped + int(arg) * 2**20, hard))
            return _train(self, *args, **kwargs)

        trainer.Trainer.train = train
'''


# -- helpers ---------------------------------------------------------------------------------------


def write_data(folder: Path, n: int, reply_words: int = 0) -> Path:
    """train.jsonl with `n` sign-off chats (no validation split); `reply_words` makes every reply long."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = signoff_conversations(n)
    if reply_words:
        for row in rows:
            row["messages"][1]["content"] = " ".join(f"lamp{i % 97}" for i in range(reply_words)) + " " + SIGN_OFF
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def prepare(name: str, data: Path, **overrides) -> Path:
    cfg = TrainConfig.from_preset("quick", **{**SMALL, **overrides})
    return runs.prepare_run(cfg, data, run_dir=runs_dir() / name)


def wait_for(what: str, check: Callable[[], bool], job: jobs.Job, timeout: float = TIMEOUT) -> None:
    """Poll `check` while `job` runs; fail at once (with its log) if the job ends first."""
    deadline = time.monotonic() + timeout
    while not check():
        if job.poll() is not None:
            log = (job.run_dir / "train.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"the job ended (exit {job.poll()}) before {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def checkpoint_names(run: Path) -> list[str]:
    return [p.name for p in runs.complete_checkpoints(run)]


def assert_no_result_offered(run: Path) -> None:
    """What the app, playground, export and publish read: no adapter, and loading one is refused."""
    from tuner.playground import read_run

    status = jobs.read_status(run)
    assert status["status"] != "completed" and not status.get("adapter")
    assert not (run / "adapter").exists()
    with pytest.raises(TunerError, match="not completed"):
        read_run(run)
    listed = next(r for r in jobs.list_runs() if r["id"] == run.name)
    assert listed["adapter"] is None and listed["resumable"]


def assert_no_token_in(folder: Path) -> None:
    leaks = [p for p in folder.rglob("*") if p.is_file() and SERVER_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.fixture(scope="module")
def fault_hook(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault_hook")
    (folder / "sitecustomize.py").write_text(FAULT_HOOK)
    return folder


@pytest.fixture
def start(fault_hook, monkeypatch):
    """jobs.start, with a fault armed in the job process (or none), and an HF token in its environment."""
    started: list[jobs.Job] = []

    def _start(run: Path, fault: str | None = None, resume: bool = False) -> jobs.Job:
        with monkeypatch.context() as env:
            env.setenv("PYTHONPATH", os.pathsep.join([str(fault_hook), os.environ.get("PYTHONPATH", "")]))
            env.setenv("HF_TOKEN", SERVER_TOKEN)
            if fault:
                env.setenv("TUNER_TEST_FAULT", fault)
            else:
                env.delenv("TUNER_TEST_FAULT", raising=False)
            job = jobs.start(run, resume=resume)
        started.append(job)
        return job

    yield _start
    for job in started:  # a failed assertion must not leave a job holding the machine
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.process.wait()


@pytest.fixture(scope="module")
def playground(default_model_path):
    from tuner.playground import Playground

    return Playground()


# -- kill -9 ---------------------------------------------------------------------------------------


def test_kill_9_mid_checkpoint_and_mid_final_save_never_offers_a_half_result(start, tmp_path, playground):
    from tuner.playground import TUNED

    run = prepare("kill-at-saves", write_data(tmp_path / "data", 12))

    # 1. killed while checkpoint-4 is written: checkpoint-2 is the last complete one
    job = start(run, fault="checkpoint:4")
    job.wait(TIMEOUT)
    assert job.process.returncode == -signal.SIGKILL
    status = jobs.read_status(run)
    assert status["status"] == "interrupted" and "Resume continues from checkpoint-2" in status["error"]
    assert (run / "checkpoints" / "checkpoint-4").is_dir()  # half-written ...
    assert checkpoint_names(run) == ["checkpoint-2"]  # ... and never taken for a checkpoint
    assert_no_result_offered(run)
    assert jobs.active_job() is None  # the kernel freed the machine's training lock

    # 2. resumed, then killed while the final adapter is written (its weights are already on disk)
    job = start(run, fault="final", resume=True)
    job.wait(TIMEOUT)
    assert job.process.returncode == -signal.SIGKILL
    status = jobs.read_status(run)
    assert status["status"] == "interrupted"
    assert status["resumed_from"] == "checkpoint-2" and status["removed_incomplete"] == ["checkpoint-4"]
    assert (run / ".adapter.tmp" / "adapter_model.safetensors").is_file()  # the half-written result exists ...
    assert_no_result_offered(run)  # ... and is not offered
    assert checkpoint_names(run) == ["checkpoint-2", "checkpoint-4"]

    # 3. resumed again: finishes from checkpoint-4, with one continuous loss curve
    job = start(run, resume=True)
    status = job.wait(TIMEOUT)
    assert status["status"] == "completed", status.get("error")
    assert status["resumed_from"] == "checkpoint-4"
    assert not (run / ".adapter.tmp").exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in jobs.read_metrics(run) if r.get("loss") is not None] == [1, 2, 3, 4]
    playground.load_run(run)
    assert playground.reply([], "Hi, where is my order?", TUNED, GenerationConfig(max_new_tokens=6), run=run).strip()
    assert_no_token_in(run)  # train.log, status, config, model card

    # deleting the run removes its data copy, checkpoints, adapter and log
    assert {"data", "checkpoints", "adapter", "train.log"} <= {p.name for p in run.iterdir()}
    jobs.delete_run(run.name)
    assert not run.exists()


def test_twenty_chats_while_a_job_trains_then_kill_9_at_a_random_moment(start, tmp_path, signoff_run, playground):
    from tuner.playground import BASE, TUNED

    data = write_data(tmp_path / "data", 12)
    run = prepare("kill-at-random", data, max_steps=1000)
    job = start(run)
    wait_for("its first step", lambda: jobs.read_status(run).get("step", 0) >= 1, job)

    # one job per machine: a second request is refused with a message naming the running run
    second = prepare("second-request", data)
    with pytest.raises(TrainingError, match=f"Another training run is in progress.*{run.name}"):
        jobs.start(second)
    assert jobs.read_status(second)["status"] == "queued"
    # a restart's reconcile leaves a live job alone
    assert run.name not in jobs.reconcile() and jobs.read_status(run)["status"] == "running"

    # 20 sessions chat at once while it trains
    playground.load_run(signoff_run)
    results: dict[int, tuple[float, str]] = {}
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        try:
            began = time.monotonic()
            reply = playground.reply([], f"Question {i}: is my lamp on its way?", (BASE, TUNED)[i % 2],
                                     GenerationConfig(max_new_tokens=8), run=signoff_run)
            results[i] = (time.monotonic() - began, reply)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wall = time.monotonic() - began
    assert not errors, errors
    assert sorted(results) == list(range(20)) and all(reply.strip() for _, reply in results.values())
    latencies = sorted(s for s, _ in results.values())
    print(f"\n20 concurrent chats (8 new tokens) while training: median {statistics.median(latencies):.1f} s, "
          f"slowest {latencies[-1]:.1f} s, all done in {wall:.1f} s")
    assert job.poll() is None and jobs.read_status(run)["status"] == "running"  # the job kept training

    # kill -9 at a random moment (a step, a checkpoint save or a rotation, whatever it is doing)
    seed = random.SystemRandom().randrange(2**32)  # the global generator is seeded the same every session
    delay = random.Random(seed).uniform(0.0, 3.0)
    print(f"kill -9 after {delay:.2f} s (seed {seed})")
    time.sleep(delay)
    os.killpg(job.pid, signal.SIGKILL)
    job.process.wait()
    done = checkpoint_names(run)
    status = jobs.read_status(run)
    assert status["status"] == "interrupted"
    assert f"Resume continues from {done[-1] if done else 'the start'}" in status["error"]
    assert_no_result_offered(run)
    assert jobs.active_job() is None and not jobs.pid_alive(job.pid)

    # resume starts from the last complete checkpoint (half-written ones are removed), then cancel
    job = start(run, resume=True)
    wait_for("the resume loaded its checkpoint", lambda: "resumed_from" in jobs.read_status(run), job)
    status = jobs.read_status(run)
    assert status["resumed_from"] == (done[-1] if done else None)
    assert set(status["removed_incomplete"]).isdisjoint(done)
    status = jobs.cancel(run)
    assert status["status"] == "cancelled" and not jobs.pid_alive(job.pid)
    assert_no_token_in(run)
    jobs.delete_run(run.name)
    jobs.delete_run(second.name)
    assert not run.exists() and not second.exists()


# -- restart ---------------------------------------------------------------------------------------


def _fake_run(name: str, **status) -> Path:
    run = runs_dir() / name
    (run / "data").mkdir(parents=True, exist_ok=True)
    TrainConfig.from_preset("quick").save(run / "config.yaml")
    (run / "status.json").write_text(json.dumps(status))
    return run


def test_restart_marks_runs_without_a_live_process_interrupted_and_leaves_live_ones():
    import psutil

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = psutil.Process()
    runs = {
        "crashed": _fake_run("restart-crashed", status="running", step=3, pid=dead.pid),
        "queued": _fake_run("restart-queued", status="queued", step=0, pid=dead.pid),
        # the pid was reused by another live process (started at another time): still stale
        "reused": _fake_run("restart-reused", status="running", step=5, pid=me.pid, pid_started=me.create_time() - 60),
        "live": _fake_run("restart-live", status="running", step=1, pid=me.pid, pid_started=me.create_time()),
        "done": _fake_run("restart-done", status="completed", adapter="adapter", pid=None),
    }
    try:
        changed = set(jobs.reconcile())
        assert {runs[k].name for k in ("crashed", "queued", "reused")} <= changed
        assert runs["live"].name not in changed and runs["done"].name not in changed
        for key in ("crashed", "queued", "reused"):
            status = json.loads((runs[key] / "status.json").read_text())
            assert status["status"] == "interrupted" and status["pid"] is None
            assert "Resume continues from the start" in status["error"]
        assert json.loads((runs["live"] / "status.json").read_text())["status"] == "running"
        assert json.loads((runs["done"] / "status.json").read_text())["status"] == "completed"
        assert not set(jobs.reconcile()) & {r.name for r in runs.values()}  # idempotent
        listed = {r["id"]: r for r in jobs.list_runs()}
        assert listed[runs["crashed"].name]["resumable"] and not listed[runs["done"].name]["resumable"]
    finally:
        for run in runs.values():  # not jobs.delete_run: it would cancel "live", whose pid is this test
            shutil.rmtree(run, ignore_errors=True)


# -- out of memory, broken loss --------------------------------------------------------------------


def test_out_of_memory_fails_with_advice_and_frees_the_machine(start, tmp_path):
    # every example ~1000 tokens, 16 to a batch: the logits alone need ~3 GB; the job may map 1 GB more
    run = prepare("out-of-memory", write_data(tmp_path / "data", 16, reply_words=900), batch_size=16,
                  max_length=1024, max_steps=2)
    job = start(run, fault="memory:1024")
    status = job.wait(TIMEOUT)
    assert job.process.returncode == 1  # the process ended on its own, reporting the failure
    assert status["status"] == "failed", status
    error = status["error"]
    assert error.startswith("Out of memory.")
    for advice in ("batch_size (now 16)", "max_length (now 1024)", "nf4", "gradient_checkpointing"):
        assert advice in error
    assert not (run / "adapter").exists() and not jobs.pid_alive(job.pid)
    assert jobs.active_job() is None  # the next job can start
    assert "Traceback" in (run / "train.log").read_text()  # the details are in the log, not in the message


def _poison_first_weight(monkeypatch) -> None:
    """Load the real model, then set one weight of its last norm to NaN (a corrupted checkpoint)."""
    import torch

    from tuner.train import trainer

    real = trainer.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    monkeypatch.setattr(trainer, "load_model", load_model)  # where build_trainer looks it up


def test_nan_loss_fails_the_run_and_never_completes(tmp_path, monkeypatch):
    run = prepare("nan-loss", write_data(tmp_path / "data", 8))
    _poison_first_weight(monkeypatch)
    status = train.train_run(run)
    assert status["status"] == "failed"
    # the message names the NaN (Trainer's logging_nan_inf_filter would show it as a loss of 0.0)
    assert "the loss became nan at step 1" in status["error"].lower() and "learning_rate" in status["error"]
    assert not (run / "adapter").exists() and not (run / ".adapter.tmp").exists()


def test_absurd_learning_rate_fails_the_run_and_never_completes(tmp_path):
    # lr 0.1 (the highest TrainConfig accepts): the loss climbs from ~4.7 to 25+ in four steps here,
    # without ever becoming NaN; an adapter from such a run is garbage and must not be offered
    run = prepare("diverging", write_data(tmp_path / "data", 16), learning_rate=0.1, max_steps=6, save_steps=6,
                  eval_steps=6, precision="fp32")
    status = train.train_run(run)
    losses = [r["loss"] for r in runs.read_metrics(run) if r.get("loss") is not None]
    assert status["status"] == "failed", f"completed with losses {losses}"
    assert "learning_rate" in status["error"]
    assert not (run / "adapter").exists()


def test_nothing_to_learn_from_fails_before_loading_the_model(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = signoff_conversations(8)
    for row in rows:  # every reply is marked "do not train" (OpenAI's weight 0): no token carries loss
        row["messages"][1]["weight"] = 0
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = prepare("all-masked", data)
    status = train.train_run(run)
    assert status["status"] == "failed" and "no example is left to train on" in status["error"]
    assert not (run / "checkpoints").exists()
    # the message sends the user to `dropped` in status.json: it must be there, naming each example
    assert [d["line"] for d in status.get("dropped", [])] == list(range(1, 9))


# -- disk full -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs: a real disk that can fill up (needs root, as in CI's container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a full disk needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _sha256_tree(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_disk_full_while_saving_keeps_the_last_good_state(tmp_path, small_disk):
    # a checkpoint every step: checkpoint-1 is written whole, then the disk fills up before checkpoint-2
    cfg = TrainConfig.from_preset("quick", **{**SMALL, "max_steps": 2, "save_steps": 1, "eval_steps": 1})
    run = runs.prepare_run(cfg, write_data(tmp_path / "data", 12), run_dir=small_disk / "run")
    filler = small_disk / "filler"
    kept: dict[str, str] = {}

    def fill_the_disk_after_the_first_checkpoint() -> bool:
        done = runs.complete_checkpoints(run)
        if done:
            kept.update(_sha256_tree(done[0]))
            stat = os.statvfs(small_disk)
            with open(filler, "wb") as fh:  # leave 256 KB: status and metrics still fit, a checkpoint does not
                os.posix_fallocate(fh.fileno(), 0, stat.f_bavail * stat.f_frsize - 256 * 1024)
        return bool(done)

    status = train_watched(run, fill_the_disk_after_the_first_checkpoint, every=0.01)
    assert filler.exists(), "the disk was never filled"
    assert status["status"] == "failed"
    error = status["error"]
    # the last good state: checkpoint-1 byte for byte, readable status and metrics, nothing half-written
    assert checkpoint_names(run) == ["checkpoint-1"]
    assert _sha256_tree(run / "checkpoints" / "checkpoint-1") == kept
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert [r["step"] for r in runs.read_metrics(run) if r.get("loss") is not None][:1] == [1]
    assert not (run / "adapter").exists()

    # space freed: resume finishes from checkpoint-1
    filler.unlink()
    status = train.train_run(run, resume=True)
    assert status["status"] == "completed" and status["resumed_from"] == "checkpoint-1"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # and the failure said what happened and what to do (checked last: the state above matters more)
    assert "disk is full" in error and "free disk space, then resume" in error, error
