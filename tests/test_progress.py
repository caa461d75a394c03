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


def test_time_left_counts_down_and_an_overrun_shows_a_clock_that_moves_never_zero_left():
    status = _status(step=4, eta_s=40.0)
    now = NOW
    assert 5 <= progress.time_left(status, now=now) <= 15  # 40 s estimated 30 s ago
    assert progress.time_left(status, now=now + 60) == 0.0
    # issue 25: the voice check estimated at 48 s took 109 s; the page sat at "about 2 s left" for a minute
    voice = _status(step=24, max_steps=24, eta_s=48.0, eta_at=NOW - 20,
                    phase="the result is saved; asking it and the base 24 new questions (the voice check)")
    lines = [progress.summary(voice, now=NOW + t) for t in (0, 27, 28, 89)]
    assert "about 28 s left" in lines[0] and "about 1 s left" in lines[1]
    assert "48 s in this part, 0 s longer than estimated" in lines[2]
    assert "1 min 49 s in this part, 1 min 01 s longer than estimated" in lines[3]
    assert all(line.startswith("The result is saved; asking it and the base 24 new questions") for line in lines)
    assert not any(" 0 s left" in line or "finishing" in line for line in lines)
    # the estimate is counted from when it was written, not from the status's last write of anything else
    assert progress.time_left({**voice, "updated_at": time.strftime(STAMP, time.localtime(NOW))}, now=NOW) == 28.0
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
    # the voice check's sentence, once and with one full stop (it may bring its own); a preference run's result
    # lines say it with the parent beside it (tuner.ui.runs_tab.preference_sentences), so its log does not again
    none = "No phrase recurs in most of your agents' replies, so there is no habit to check automatically."
    done = {"status": "completed", "max_steps": 2, "voice": {"sentence": none}}
    assert progress.sentences(done, [])[0] == f"Voice check on new questions: {none}"
    assert progress.sentences({**done, "preference": {"beta": 0.1}}, []) == [
        "Finished: the adapter is saved and checked; try it on the Playground tab."]
    failed = progress.sentences({"status": "failed", "error": "Out of memory. Fix: lower batch_size."}, [])
    assert failed == ["Stopped (failed): Out of memory. Fix: lower batch_size."]


def test_loss_points_name_both_curves_and_smooth_the_jagged_train_loss():
    points = progress.loss_points([{"step": 0, "eval_loss": 3.1}, {"step": 1, "loss": 3.0}])
    assert points == [{"step": 0, "loss": 3.1, "series": "held-out loss"},
                      {"step": 1, "loss": 3.0, "series": "train loss"},
                      {"step": 1, "loss": 3.0, "series": progress.SMOOTHED}]  # starts where the loss starts
    jagged = [{"step": i, "loss": 2.0 + (0.8 if i % 2 else -0.8) - 0.05 * i} for i in range(1, 21)]
    by = {name: [p["loss"] for p in progress.loss_points(jagged) if p["series"] == name]
          for name in ("train loss", progress.SMOOTHED)}
    assert len(by["train loss"]) == len(by[progress.SMOOTHED]) == 20

    def swing(values):
        return max(abs(b - a) for a, b in zip(values, values[1:], strict=False))

    assert swing(by[progress.SMOOTHED][5:]) < swing(by["train loss"]) / 3  # readable through the zigzag
    assert by[progress.SMOOTHED][-1] < by[progress.SMOOTHED][4]  # and still going down with it


def test_the_line_says_the_epochs_the_run_really_makes():
    running = _status(step=3, max_steps=24, examples_seen=24, examples_total=192, train_examples=94)
    assert "24 of 192 examples seen (2.04 epochs of 94 examples)" in progress.summary(running, 8, 1, now=NOW)
    done = {"status": "completed", "step": 12, "max_steps": 12, "examples_seen": 96, "train_examples": 94,
            "epochs": 1.02, "wall_s": 60.0}
    assert progress.epochs_run(done) == "12 steps (1.02 epochs of 94 examples)"
    assert progress.epochs_run({"status": "completed", "step": 5}) == "5 steps"  # an older run: steps only
    assert progress.fmt_duration(0.3) == "under 1 s" and progress.fmt_duration(0) == "0 s"
    # one time per run on every view: what the user waited (start-up included), not the training clock alone
    assert "took 2 min 28 s" in progress.summary({**done, "wall_s": 123.0, "total_s": 148.0})
    assert progress.took({"wall_s": 300.0, "total_s": 100.0}) == 300.0  # resumed: earlier sessions count


def test_log_tail_keeps_the_last_state_of_redrawn_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("loading\n 10%|#   \r 50%|#####   \r100%|##########\nsaved\n")
    assert progress.log_tail(log) == "saved\n100%|##########\nloading"
    assert progress.log_tail(tmp_path / "missing.log") == ""
