"""`python -m tuner train` under `accelerate launch` with two processes (DDP over gloo, on this CPU).

`accelerate launch --cpu` starts one process whatever --num_processes says (accelerate's simple launcher);
`--multi_gpu` starts torch's launcher, which on a machine without a GPU runs the processes on the CPU
(gloo). Rank 0 owns the run folder: status, metrics, checkpoints, the adapter and the voice check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import signoff_conversations
from signoff_run import write_data

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
BATCH = 2
N_TRAIN = 16
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ACCELERATE.exists(), reason="needs accelerate (requirements.txt)")]


def launch(args: list[str], **kw) -> subprocess.Popen:
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tuner", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


@pytest.fixture
def small_data(tmp_path) -> Path:
    data = tmp_path / "data"
    write_data(data, signoff_conversations(N_TRAIN + 4), 4)
    return data


def settings(steps: int, voice_prompts: int) -> list[str]:
    return ["--preset", "quick", "--max-steps", str(steps), "--batch-size", str(BATCH), "--max-length", "128",
            "--eval-steps", "2", "--save-steps", "2", "--save-every-s", "0", "--voice-prompts", str(voice_prompts)]


def test_two_processes_train_one_run_that_rank0_owns_and_a_killed_launch_resumes(small_data, tmp_path,
                                                                                 default_model_path):
    """One run, as a user meets it: two processes train, the launcher is killed mid-run, `--resume` finishes it.
    (One test rather than two: every launch of two processes loads the model twice.)"""
    import psutil

    from tuner.runs import complete_checkpoints

    run = tmp_path / "run"
    steps = 12
    proc = launch(["--data", str(small_data), "--out", str(run), *settings(steps, 2)])
    deadline = time.monotonic() + 600
    while not complete_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert complete_checkpoints(run), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint"
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # `kill` of the launcher: it stops its processes (they run in sessions of their own)
    _, err = proc.communicate(timeout=120)
    assert f"effective batch: {2 * BATCH} examples a step ({BATCH} per process x 1 accumulation x 2 processes)" in err
    gone, alive = psutil.wait_procs(workers, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"processes left running after the launcher was killed: {alive}"
    before = json.loads((run / "status.json").read_text())
    assert before["status"] == "running" and before["step"] < steps  # killed, not finished

    resumed = launch(["--resume", str(run), "--json"])
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    # one report, from rank 0
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    report = lines[0]
    assert report["status"] == "completed", report
    assert report["processes"] == 2 and report["effective_batch"] == 2 * BATCH

    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed", status
    assert status["resumed_from"].startswith("checkpoint-")
    assert status["processes"] == 2 and status["step"] == steps and status["effective_batch"] == 2 * BATCH
    assert status["examples_seen"] == steps * 2 * BATCH
    assert status["quantization"] == "nf4"  # the 4-bit base trains under DDP on the CPU too
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # one record a step (only rank 0 writes); the curve continues where the checkpoint left it, no step twice
    assert [m["step"] for m in metrics if m["loss"] is not None] == list(range(1, steps + 1))
    # each process took its own half of the data: 12 steps x 2 x 2 examples of 16 is three epochs
    assert metrics[-1]["epoch"] == pytest.approx(steps * 2 * BATCH / N_TRAIN)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "README.md").is_file()
    assert status["voice"]["tuned"]["prompts"] == 2  # rank 0 asked the held-out questions, once
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".adapter*"))
