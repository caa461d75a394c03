"""What the Train tab says about a run: the phase, a clock that moves, the log in sentences, both loss curves."""

from __future__ import annotations

import time

from tuner import progress

STAMP = "%Y-%m-%dT%H:%M:%S%z"


NOW = float(int(time.time()))  # whole seconds: the status stamps have no fractions


def _status(now: float = NOW, **fields) -> dict:
    return {"status": "running", "step": 0, "max_steps": 12, "started_at": time.strftime(STAMP, time.localtime(now - 90)),
            "updated_at": time.strftime(STAMP, time.localtime(now - 30)), **fields}


def test_before_the_first_step_it_says_what_it_is_doing_and_the_clock_moves():
    status = _status()
    now = NOW
    first, later = progress.summary(status, 8, 1, now=now), progress.summary(status, 8, 1, now=now + 5)
    assert first.startswith("Loading the model and measuring the starting loss")
    assert "step 0 / 12" in first and "running for 1 min 30 s" in first
    assert "running for 1 min 35 s" in later  # nothing new was written, yet the clock moved
    assert "left" not in first  # no time-left guess before a step was timed
    # a run that writes its phase is described in its own words
    assert progress.summary(_status(phase="evaluating 3 of 10 batches"), now=now).startswith("Evaluating 3 of 10")
    stepping = progress.summary(_status(step=3, phase="training: step 4 of 12"), now=now)
    assert stepping.startswith("Training: step 4 of 12 · ") and "step 3 / 12" not in stepping  # said once


def test_examples_seen_come_from_the_status_or_the_steps():
    assert progress.examples_seen(_status(step=3), 8, 2) == (48, 192)
    assert progress.examples_seen(_status(step=3, examples_seen=20, examples_total=96), 8, 2) == (20, 96)
    assert progress.examples_seen(_status(step=3, examples_seen=20), 8, 2) == (20, 192)
    assert "20 of 96 examples seen" in progress.summary(_status(step=3, examples_seen=20, examples_total=96))


def test_time_left_counts_down_and_never_says_zero_seconds_left():
    status = _status(step=4, eta_s=40.0)
    now = NOW
    assert 5 <= progress.time_left(status, now=now) <= 15  # 40 s estimated 30 s ago
    assert progress.time_left(status, now=now + 60) == 0.0
    assert "finishing the last steps" in progress.summary(status, now=now + 60)
    done = {"status": "completed", "step": 12, "max_steps": 12, "wall_s": 75.0}
    assert progress.summary(done).startswith("Completed · step 12 / 12") and "took 1 min 15 s" in progress.summary(done)


def test_the_log_reads_as_sentences_newest_first():
    metrics = [{"step": 0, "eval_loss": 3.1}, {"step": 1, "loss": 3.0, "tokens_per_s": 310.0},
               {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.4}]
    lines = progress.sentences({"status": "completed", "max_steps": 2}, metrics)
    assert lines[0].startswith("Finished")
    assert lines[1] == "Step 2: loss on the held-out examples is 2.400, down from 3.100."
    assert lines[-2] == "Step 1 of 2: training loss 3.000, 310 tokens/s."
    assert lines[-1] == "Step 0: loss on the held-out examples is 3.100 (the starting point)."
    failed = progress.sentences({"status": "failed", "error": "Out of memory. Fix: lower batch_size."}, [])
    assert failed == ["Stopped (failed): Out of memory. Fix: lower batch_size."]


def test_loss_points_name_both_curves():
    points = progress.loss_points([{"step": 0, "eval_loss": 3.1}, {"step": 1, "loss": 3.0}])
    assert points == [{"step": 0, "loss": 3.1, "series": "held-out loss"},
                      {"step": 1, "loss": 3.0, "series": "train loss"}]


def test_log_tail_keeps_the_last_state_of_redrawn_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("loading\n 10%|#   \r 50%|#####   \r100%|##########\nsaved\n")
    assert progress.log_tail(log) == "saved\n100%|##########\nloading"
    assert progress.log_tail(tmp_path / "missing.log") == ""
