"""The page's view functions, without a server: what each view shows for a given state."""

from __future__ import annotations

import re

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


def test_headline_and_files_table_count_the_same_conversations():
    report = {"ok": True, "train_examples": 18, "validation_examples": 2, "dropped_total": 10,
              "totals": {"conversations_read": 30, "conversations_kept": 20, "conversations_dropped": 10},
              "files": [{"file": "a.csv", "format": "tickets-csv", "rows_read": 300, "row_unit": "rows",
                         "conversations_read": 30, "conversations_kept": 20, "conversations_dropped": 10,
                         "dropped": 12}]}
    headline = data_tab.report_markdown(report)
    assert "30 conversations read · 20 kept, 10 dropped" in headline
    row = data_tab.files_table(report).iloc[0]
    assert (row["read"], row["kept"], row["dropped"]) == (30, 20, 10)  # conversations, as the headline
    assert "300 rows in the file" in row["what it is"]
    # advice that names a command-line flag is for the terminal, not the page
    cli = {**report, "warnings": ["Map them with --assistant NAME or --user NAME.", "Some rows are long."]}
    assert "--assistant" not in data_tab.report_markdown(cli) and "Some rows are long" in data_tab.report_markdown(cli)


def test_an_empty_session_shows_empty_views():
    views = data_tab.views(data_tab.new_session())
    assert views["report"] == data_tab.INTRO
    assert views["files_table"].empty and views["dropped_table"].empty
    assert views["preview"] == [] and views["learned"] == [] and views["preview_system"] == ""
    assert views["speakers"]["visible"] is False and views["to_train"]["interactive"] is False
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
