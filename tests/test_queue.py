"""The machine's queue (issue 23): one job trains at a time, a second start waits in line instead of failing.

Another user's job is a real process that holds the machine's training lock (as a job does), beside a run
folder that says it trains for "alice"; runs queued behind it are real run folders. Where a queued run must
really start, the job is the real `python -m tuner train` process that tuner.jobs starts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import hold_machine_lock, signoff_conversations

from tuner import jobqueue, jobs, runs
from tuner.config import TrainConfig
from tuner.errors import MachineBusy, NotYourRun
from tuner.paths import runs_dir, tuner_home

ROOT = Path(__file__).resolve().parent.parent
# the smallest real run: one step, no validation split (no evaluations, no voice check)
TINY = {"max_steps": 1, "batch_size": 2, "max_length": 64, "quantization": "none", "lora_r": 4, "lora_alpha": 8,
        "warmup_ratio": 0.0, "early_stopping_patience": 0, "save_steps": 100, "eval_steps": 100, "voice_prompts": 0}
@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rows = signoff_conversations(12)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def prepare(name: str, data: Path) -> Path:
    """A prepared tiny run named `name` and a random tail (the session's tests share one runs folder)."""
    return runs.prepare_run(TrainConfig.from_preset("quick", **TINY), data,
                            run_dir=runs_dir() / f"{name}-{secrets.token_hex(3)}")


@pytest.fixture
def machine() -> Iterator[dict]:
    """Clean up whatever a test queues or starts: the queue is emptied first (so nothing moves on), then every
    holder process is killed and every run the test made that is still active is cancelled."""
    held: dict = {"holders": []}
    before = {run.id for run in runs.all_runs()}
    yield held
    with jobqueue.locked() as queue:
        queue.clear()
    for proc in held["holders"]:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for run in runs.all_runs():
        if run.id not in before and runs.read_status(run.path).get("status") in runs.ACTIVE:
            jobs.cancel(run.path, dispatch_next=False)
    assert jobs.active_job() is None


def hold_machine(machine: dict, data: Path, owner: str = "alice", estimate_s: float = 240.0) -> Path:
    """Another user's job: a run folder that trains for `owner`, and a process holding the machine lock."""
    run = prepare(f"{owner}-job", data)
    proc = hold_machine_lock(run.name)
    machine["holders"].append(proc)
    runs.update_status(run, status="running", owner=owner, pid=proc.pid, pid_started=jobs._create_time(proc.pid),
                       wait_from=time.time() - 60, estimate_s=estimate_s)
    return run


def test_a_start_while_busy_waits_in_line_and_says_so_and_only_its_owner_cancels_it(data, machine):
    from tuner.ui import runs_tab, train_tab

    alice = hold_machine(machine, data, estimate_s=300.0)
    assert jobs.active_job() is not None

    # a second and a third start: queued, not refused, each told its place and who is ahead
    bob = jobs.start_new(lambda: prepare("bob-run", data), owner="bob")
    carol = jobs.start_new(lambda: prepare("carol-run", data), owner="carol")
    for run in (bob, carol):
        status = jobs.read_status(run)
        assert status["status"] == "queued" and status["pid"] is None
    assert jobs.place(bob)["position"] == 1 and jobs.place(carol)["position"] == 2
    runs.update_status(alice, wait_from=time.time() - 60)  # alice's 5-minute job trains for a minute now
    said = jobs.queue_sentence(bob)
    assert re.fullmatch(r"Queued: 1st in line behind alice's run \(training, about (4 min 00|3 min 5\d) s left\)\. "
                        r"It starts by itself when the machine frees, in about (4 min 00|3 min 5\d) s\.", said), said
    said = jobs.queue_sentence(carol)
    assert said.startswith("Queued: 2nd in line behind alice's run (training, about "), said
    assert re.search(r"and bob's run \(waiting, about \d+ (s|min \d\d s)\)\. It starts", said), said
    with pytest.raises(MachineBusy, match=alice.name):  # the low-level start still refuses
        jobs.start(carol)

    # everyone sees the queue; a viewer who may not see an owner's runs reads "another team", without run ids
    rows = jobs.queue_rows()
    assert [(r["position"], r["owner"], r["run"]) for r in rows] == [
        (0, "alice", alice.name), (1, "bob", bob.name), (2, "carol", carol.name)]
    assert rows[0]["time_left_s"] == pytest.approx(240, abs=10) and rows[2]["starts_in_s"] > rows[1]["starts_in_s"]
    carols_view = jobs.queue_rows(lambda owner: owner == "carol")
    assert [(r["owner"], r["run"]) for r in carols_view] == [
        ("another team", None), ("another team", None), ("carol", carol.name)]
    said = jobs.queue_sentence(carol, lambda owner: owner == "carol")
    assert "behind another team's run (training, about " in said and "and another team's run (waiting" in said
    assert "alice" not in said and "bob" not in said

    # the Runs list and the Train tab say it too
    listed = {r["id"]: r for r in jobs.list_runs()}
    assert listed[bob.name]["queue_position"] == 1 and listed[carol.name]["queue_position"] == 2
    assert listed[alice.name]["queue_position"] is None
    frame = runs_tab.runs_frame()
    assert frame.set_index("run").loc[carol.name, "status"] == "queued (2nd in line)"
    view = train_tab.run_status.__wrapped__(bob.name)
    assert 'data-status="queued"' in view["progress"] and "Queued: 1st in line behind alice&#x27;s run" in \
        view["progress"]
    table = train_tab.queue_view.__wrapped__()["queue_table"]["value"]
    assert list(table["place"]) == ["training", "1st", "2nd"] and list(table["owner"]) == ["alice", "bob", "carol"]
    assert list(table["starts in"])[0] == "now" and all(t.startswith("about ") for t in table["time left"])

    # only the owner cancels: carol cannot cancel bob's run (told whose it is, when she may see it)
    with pytest.raises(NotYourRun, match=f"{bob.name} was started by bob: only they can cancel it"):
        jobs.cancel(bob, user="carol")
    with pytest.raises(NotYourRun, match="started by someone on another team"):
        jobs.cancel(alice, user="carol", visible=lambda owner: owner == "carol")
    assert jobs.read_status(bob)["status"] == "queued" and jobs.read_status(alice)["status"] == "running"
    # bob cancels his own: it leaves the queue, carol moves up
    status = jobs.cancel(bob, user="bob")
    assert status["status"] == "cancelled" and "waited in the queue" in status["error"]
    assert jobs.place(bob) is None and jobs.place(carol)["position"] == 1
    assert jobs.queue_sentence(carol).startswith("Queued: 1st in line behind alice's run (training")
    assert jobs.active_job() is not None  # alice's job was never touched


def test_the_queue_survives_a_restart_and_two_dispatchers_start_one_job(data, machine):
    hold_machine(machine, data)
    bob = jobs.start_new(lambda: prepare("bob-run", data), owner="bob")
    carol = jobs.start_new(lambda: prepare("carol-run", data), owner="carol")
    gone = jobs.start_new(lambda: prepare("deleted-run", data), owner="dave")
    before = jobqueue.entries()
    assert [e["run"] for e in before] == [bob.name, carol.name, gone.name]
    assert (tuner_home() / "queue.json").is_file()

    # the app restarts (a fresh process reconciles, as app.py does); a run deleted meanwhile leaves the queue
    import shutil

    shutil.rmtree(gone)
    out = subprocess.run([sys.executable, "-c", "from tuner import jobs; print(jobs.reconcile())"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert jobqueue.entries() == before[:2]
    assert jobs.read_status(bob)["status"] == "queued" and jobs.place(carol)["position"] == 2

    # alice's job is killed: the machine is free; two dispatchers race for it and start one job, the head
    holder = machine["holders"][0]
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert jobs.active_job() is None
    race = ("import time, sys; from tuner import jobs; time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
            "job = jobs.dispatch(); print(job.run_dir.name if job else '-')")
    at = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", race, at], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=os.environ) for _ in range(2)]
    started = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert started == ["-", bob.name]
    assert jobs.active_job()["holder"].startswith(f"run {bob.name}, pid ")
    assert jobs.read_status(bob)["pid"] and jobs.place(carol)["position"] == 1

    # bob's job is cancelled: the machine frees, and carol's run starts at once
    assert jobs.cancel(bob)["status"] == "cancelled"
    status = jobs.read_status(carol)
    assert status["pid"] and jobs.pid_alive(status["pid"]) and jobqueue.entries() == []
    assert jobs.active_job()["holder"].startswith(f"run {carol.name}, ")


def test_a_queued_run_starts_by_itself_when_the_job_before_it_ends(data, machine):
    first = jobs.start_new(lambda: prepare("first-run", data), owner="alice")
    assert jobs.read_status(first)["pid"]  # the machine was free: it started
    second = jobs.start_new(lambda: prepare("second-run", data), owner="bob")
    assert jobs.read_status(second)["status"] == "queued"
    assert jobs.queue_sentence(second).startswith("Queued: 1st in line behind alice's run (training")

    # nobody here dispatches: the first job, as it exits, starts the next
    deadline = time.monotonic() + 600
    while jobs.read_status(second).get("status") != "running":
        assert time.monotonic() < deadline, (jobs.read_status(first), (first / "train.log").read_text()[-2000:])
        assert jobs.read_status(first)["status"] in ("queued", "running", "completed"), jobs.read_status(first)
        time.sleep(0.2)
    assert jobs.read_status(first)["status"] == "completed"
    assert jobqueue.entries() == [] and jobs.place(second) is None
    assert jobs.active_job()["holder"].startswith(f"run {second.name}, pid ")
    rows = jobs.queue_rows()
    assert [(r["position"], r["owner"], r["run"]) for r in rows] == [(0, "bob", second.name)]
    jobs.cancel(second)


def test_the_cli_waits_in_line_by_default_and_ctrl_c_leaves_the_queue(data, machine, capsys):
    from tuner.cli import main

    alice = hold_machine(machine, data)
    args = ["train", "--data", str(data), "--max-steps", "1", "--quantization", "none"]
    assert main([*args, "--no-queue"]) == 2  # as before the queue: refused, naming the job that trains
    assert f"Another training run is in progress on this machine (run {alice.name}," in capsys.readouterr().err
    assert jobqueue.entries() == []

    cmd = [sys.executable, "-m", "tuner", *args, "--owner", "bob"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        lines = []
        while not any(line.startswith("Queued:") for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        said = lines[-1]
        assert said.startswith("Queued: 1st in line behind alice's run (training") and "Ctrl-C leaves the queue" in said
        run = Path(next(line for line in lines if line.startswith("run folder: ")).split(": ", 1)[1].strip())
        assert jobs.place(run)["position"] == 1 and jobs.owner_of(run) == "bob"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert jobs.read_status(run)["status"] == "cancelled" and jobqueue.entries() == []
