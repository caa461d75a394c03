"""The page's view functions, without a server: what each view shows for a given state."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuner import dataset, formats
from tuner.config import ConvertConfig
from tuner.ui import data_tab, train_tab
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
