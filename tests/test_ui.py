"""The page's view functions, without a server: what each view shows for a given state."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from tuner import dataset, formats
from tuner.config import ConvertConfig
from tuner.ui import data_tab, playground_tab, train_tab
from tuner.ui.common import keyed

TRAIN, HELD_OUT = train_tab.LOSS_COLORS["train loss"], train_tab.LOSS_COLORS["held-out loss"]


def test_the_loss_plot_draws_the_first_points_and_both_curves_in_colour():
    empty = train_tab.loss_svg([], 12)
    assert "No loss measured yet" in empty and "<circle" not in empty
    first = train_tab.loss_svg([{"step": 0, "eval_loss": 4.3}, {"step": 1, "loss": 3.7}], 12)
    assert first.count(f'fill="{TRAIN}"') >= 1 and first.count(f'fill="{HELD_OUT}"') >= 1  # lone points show
    assert "<path" not in first  # no line yet, only dots
    later = train_tab.loss_svg([{"step": 0, "eval_loss": 4.3}] + [{"step": s, "loss": 4 - s / 10} for s in (1, 2, 3)]
                               + [{"step": 3, "eval_loss": 3.5}], 12)
    assert f'stroke="{TRAIN}"' in later and re.search(f'<path[^>]*stroke="{HELD_OUT}"', later)
    assert ">12</text>" in later  # the step axis spans the whole run from the start


def faulty_jsonl(path: Path) -> Path:
    """30 lines as a first-time user's export might be: 20 good chats, 8 lines that are not a conversation
    (6 broken JSON, 2 without content), 1 question with no reply and 1 reply too long to train on."""
    lines = []
    for i in range(30):
        if i in (3, 7, 11, 15, 19, 23):
            lines.append('{"messages": [{"role": "user", "content": "cut off')
        elif i in (26, 28):
            lines.append(json.dumps({"messages": [{"role": "user"}]}))
        elif i == 5:
            lines.append(json.dumps({"messages": [{"role": "user", "content": "anyone there?"}]}))
        elif i == 9:
            lines.append(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "long " * 600}]}))
        else:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"Where is order {i}?"},
                                                  {"role": "assistant", "content": f"Order {i} ships Monday."}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_faulty_file_counts_the_same_things_in_headline_files_table_and_dropped_table(tmp_path, tokenizer):
    report = dataset.convert([faulty_jsonl(tmp_path / "faulty.jsonl")], tmp_path / "out",
                             ConvertConfig(min_examples=1, max_length=256), tokenizer=tokenizer, hints="page")
    headline = data_tab.report_markdown(report)
    files, dropped = data_tab.files_table(report), data_tab.dropped_table(report)
    assert "20 conversations kept, 10 dropped (8 lines and 2 conversations; each listed below)" in headline
    assert [tuple(r) for r in files[["file", "in the file", "kept", "dropped"]].itertuples(index=False)] == [
        ("faulty.jsonl", "30 lines", 20, 10)]
    assert "dropped: 8 lines and 2 conversations" in files.iloc[0]["what it is"]
    assert len(dropped) == 10 and set(dropped["file"]) == {"faulty.jsonl"}
    conversation_kinds = {formats.NO_ASSISTANT, formats.TOO_LONG, formats.UNMAPPED_SPEAKER}
    assert sum(kind in conversation_kinds for kind in dropped["kind"]) == 2  # the rest are the 8 lines
    assert sorted(dropped["line"]) == [4, 6, 8, 10, 12, 16, 20, 24, 27, 29]  # 1-based: every line not kept, once
    assert report["train_examples"] + report["validation_examples"] == 20  # "kept" is what training gets
    assert "22" not in headline  # no third count (conversations read) beside kept and dropped


def test_the_headline_says_none_dropped_and_warns_when_the_list_is_cut():
    clean = {"ok": True, "train_examples": 1, "validation_examples": 1, "dropped": [],
             "totals": {"conversations_kept": 2, "dropped": 0, "dropped_by_unit": {}}, "files": []}
    assert "**2 conversations kept, none dropped**" in data_tab.report_markdown(clean)
    assert "1 training example and 1 validation example" in data_tab.report_markdown(clean)
    cut = {**clean, "dropped": [{"file": "a.csv", "line": i} for i in range(3)],
           "totals": {"conversations_kept": 2, "dropped": 12_001,
                      "dropped_by_unit": {"rows": 12_000, "files": 1}}}
    assert "12,001 dropped (12,000 rows and 1 unreadable file; the first 3 listed below)" in \
        data_tab.report_markdown(cut)
    nothing = {**clean, "ok": False, "dropped": [{"file": "a.jsonl", "line": i} for i in (1, 2, 3)],
               "totals": {"conversations_kept": 0, "dropped": 3, "dropped_by_unit": {"lines": 3}}}
    assert "**No conversations kept, 3 dropped (3 lines; each listed below)**" in data_tab.report_markdown(nothing)
    # advice that names a command-line flag is for the terminal, not the page
    cli = {**clean, "warnings": ["Map them with --assistant NAME or --user NAME.", "Some rows are long."]}
    assert "--assistant" not in data_tab.report_markdown(cli) and "Some rows are long" in data_tab.report_markdown(cli)


def test_an_empty_session_shows_empty_views():
    views = data_tab.views(data_tab.new_session())
    assert views["report"] == data_tab.INTRO
    assert views["files_table"].empty and views["dropped_table"].empty
    assert views["preview"] == [] and views["learned"] == [] and views["preview_system"] == ""
    assert views["speakers"]["visible"] is False and views["to_train"]["interactive"] is False
    assert views["histogram"].visible is False  # hidden, not emptied: see data_tab.histogram
    assert list(views) == data_tab.VIEWS  # one function fills every view


def test_handlers_return_values_by_component_name():
    boxes = {"a": object(), "b": object()}
    assert keyed(lambda: {"a": 1, "b": 2}, boxes)() == {boxes["a"]: 1, boxes["b"]: 2}

    def stream():
        yield {"a": 1}
        yield {"b": 2}

    assert list(keyed(stream, boxes)()) == [{boxes["a"]: 1}, {boxes["b"]: 2}]


def test_every_train_setting_is_on_the_page_and_old_api_calls_keep_their_order():
    import dataclasses

    from tuner.config import TrainConfig

    shown = train_tab.MAIN_SETTINGS + train_tab.MORE_SETTINGS
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"base_model", "preset"}
    assert sorted(shown) == sorted(fields)  # each once, none missing: derived from the dataclass
    assert shown[:8] == ["max_steps", "num_epochs", "learning_rate", "lora_r", "batch_size", "max_length",
                         "quantization", "method"]  # positional /train and /estimate callers are not reordered


def test_a_run_whose_result_is_saved_says_it_can_be_chatted_with_before_its_voice_check_ends():
    saved = {"status": "running", "phase": "the result is saved; asking it and the base 8 new questions (the voice "
             "check)", "step": 12, "max_steps": 12, "adapter": "/runs/r/adapter", "saved_at": 1.0}
    html = train_tab.progress_html(saved)
    assert "chat with it on the <b>Playground</b> tab while the voice check finishes" in html
    training = {**saved, "phase": "training: step 3 of 12", "step": 3, "saved_at": None}
    assert "Playground" not in train_tab.progress_html(training)  # nothing saved by this attempt yet
    stopped = {**saved, "status": "cancelled", "phase": None}
    assert "resume to finish the voice check" in train_tab.progress_html(stopped)
    done = {**saved, "status": "completed", "voice": {"sentence": "ends like your agents on 7 of 8 new questions"}}
    assert "Playground" not in train_tab.progress_html(done) and "7 of 8 new questions" in train_tab.progress_html(done)


def test_the_loss_plot_smooths_the_train_loss_and_names_every_line():
    jagged = [{"step": 0, "eval_loss": 4.3}] + [{"step": s, "loss": 3.5 - s / 20 + (0.4 if s % 2 else -0.4)}
                                                 for s in range(1, 13)] + [{"step": 12, "eval_loss": 3.0}]
    svg = train_tab.loss_svg(jagged, 12)
    smooth = train_tab.LOSS_COLORS["train loss (smoothed)"]
    assert re.search(f'<path[^>]*stroke="{smooth}"[^>]*stroke-width="3"', svg)  # a thick line through the dots
    assert f'fill="{smooth}"' not in svg.split("<rect")[0]  # no dots of its own: it is not a measurement
    for series in ("train loss", "train loss (smoothed)", "held-out loss"):
        assert f">{series}</text>" in svg  # the legend names each line drawn


def test_the_estimate_names_the_steps_the_run_takes_and_why_and_a_changed_epochs_wins(tmp_path):
    import json
    import math
    from pathlib import Path

    from tuner.config import DEFAULT_PRESET, TrainConfig
    from tuner.dataset import convert

    data = tmp_path / "data"
    convert([Path(__file__).resolve().parent.parent / "datasets" / "kettle_openai.jsonl"], data)
    n_train = json.loads((data / "report.json").read_text())["train_examples"]
    names = train_tab.MAIN_SETTINGS + train_tab.MORE_SETTINGS
    values = train_tab.apply_preset(DEFAULT_PRESET)
    session = {"ok": True, "data_dir": str(data)}
    # the preset as it comes: Max steps shows -1, and the label and the estimate say what that means
    assert values[names.index("max_steps")] == -1 and "-1: from the epochs" in train_tab.SETTING_LABELS["max_steps"]
    cfg = train_tab.build_train_config("default", DEFAULT_PRESET, names, tuple(values))
    assert cfg == TrainConfig.from_preset(DEFAULT_PRESET)
    text = train_tab.estimate_run(session, "default", DEFAULT_PRESET, *values)
    assert text.startswith(f"**Estimate:** 24 steps of 8 examples (1 epoch of {n_train} examples is "
                           f"{math.ceil(n_train / 8)} steps, raised to the preset's minimum of 24 steps")
    assert f"the run sees **192 examples**, {192 / n_train:.3g} epochs of {n_train} examples" in text
    # Epochs changed on the page is the user's word, as --epochs is: the preset's floor steps aside
    values[names.index("num_epochs")] = 2.0
    two = train_tab.build_train_config("default", DEFAULT_PRESET, names, tuple(values))
    assert (two.min_steps, two.step_limit, two.planned_steps(n_train)) == (0, 0, math.ceil(2 * n_train / 8))
    text = train_tab.estimate_run(session, "default", DEFAULT_PRESET, *values)
    assert text.startswith(f"**Estimate:** {math.ceil(2 * n_train / 8)} steps of 8 examples (2 epochs of {n_train} "
                           "examples)")
    # redone on every change, a setting that cannot be used is said in place of the estimate
    values[names.index("learning_rate")] = 5.0
    assert train_tab.estimate_again(session, "default", DEFAULT_PRESET, *values).startswith(
        "**No estimate:** learning\\_rate must be in \\(0, 0.1\\], got 5.0.")  # escaped: it renders as said


def test_the_runs_tab_always_shows_a_run_the_newest_unless_one_is_picked(signoff_data, tmp_path, monkeypatch):
    import os
    import time

    from tuner import runs
    from tuner.config import TrainConfig
    from tuner.paths import runs_dir
    from tuner.ui import runs_tab

    monkeypatch.setenv("TUNER_HOME", str(tmp_path / "home"))  # a machine with just these runs
    assert runs_tab.refresh_runs(None)["runs_pick"]["value"] is None  # no run at all: nothing to pick
    older = runs.prepare_run(TrainConfig.from_preset("quick"), signoff_data, run_dir=runs_dir() / "run-older")
    newer = runs.prepare_run(TrainConfig.from_preset("quick"), signoff_data, run_dir=runs_dir() / "run-newer")
    os.utime(older / "config.yaml", (time.time() - 60, time.time() - 60))
    # the page opened before any run, a run was trained: the tab picks it rather than showing no run
    assert runs_tab.refresh_runs(None)["runs_pick"] == {"__type__": "update", "choices": ["run-newer", "run-older"],
                                                        "value": "run-newer"}
    assert runs_tab.refresh_runs("run-older")["runs_pick"]["value"] == "run-older"  # the user's pick is kept
    assert runs_tab.refresh_runs("run-deleted")["runs_pick"]["value"] == "run-newer"  # a deleted pick: the newest
    assert newer.name == "run-newer"


def test_every_table_is_headed_by_its_column_names_before_it_has_rows():
    """Issue 27: empty tables were headed "1 2 3" (gradio's placeholder when a Dataframe has no value)."""
    import gradio as gr

    from tuner.ui import data_tab, playground_tab, runs_tab, train_tab

    with gr.Blocks():
        built = {**data_tab.build(), **train_tab.build(), **playground_tab.build(), **runs_tab.build()}
    tables = {name: c for name, c in built.items() if isinstance(c, gr.Dataframe)}
    assert len(tables) >= 8
    for name, table in tables.items():
        headers = [str(h) for h in (table.value or {}).get("headers") or []]
        assert headers and not all(h.isdigit() for h in headers), (name, headers)
    # and a run's feedback views before any run is picked
    empty = runs_tab.feedback_report(None)
    for name in ("fb_counts", "fb_wins", "fb_lost"):
        assert list(empty[name].columns), name


def test_stop_gives_send_back_only_once_the_reply_has_ended(monkeypatch):
    """Stop sets the reply's flag and waits for the reply to end, so no word lands after Send is back; a reply
    that never ends (its connection lost) still gives Send back after STOP_WAIT_S."""
    request = SimpleNamespace(session_hash="stop-test")
    ended = []

    def reply(linger_s: float) -> None:  # a streaming reply: stops at its next token, after the flag is set
        flag = playground_tab.stop_flag(request, "chat")
        flag.wait()
        time.sleep(linger_s)
        ended.append(time.monotonic())
        playground_tab.drop_flag(request, "chat", flag)

    playground_tab.stop_flag(request, "chat", fresh=True)
    worker = threading.Thread(target=reply, args=(0.3,))
    worker.start()
    buttons = playground_tab.press_stop(request)
    back = time.monotonic()
    worker.join()
    assert ended and ended[0] <= back  # Send came back after the reply's last word
    assert buttons["send_btn"]["visible"] and not buttons["stop_btn"]["visible"]

    monkeypatch.setattr(playground_tab, "STOP_WAIT_S", 0.2)
    playground_tab.stop_flag(request, "chat", fresh=True)  # a reply whose event was lost: it never ends
    start = time.monotonic()
    buttons = playground_tab.press_stop(request)
    assert 0.2 <= time.monotonic() - start < 2 and buttons["send_btn"]["visible"]
    assert playground_tab.signal_stop(request, "chat") is False  # still running, as far as the server knows
