"""tuner.feedback: judgements in feedback.jsonl, blind A/B, the report, trl preference pairs, preference files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuner import feedback
from tuner.errors import DataError, TunerError
from tuner.runs import Run

PROMPT = [{"role": "system", "content": "You are Lumen Lamps support."},
          {"role": "user", "content": "My lamp flickers."},
          {"role": "assistant", "content": "Sorry to hear that! Which model?"},
          {"role": "user", "content": "The Halo."}]


@pytest.fixture
def run(tmp_path) -> Run:
    folder = tmp_path / "run-1"
    folder.mkdir()
    return Run(folder)


def test_each_judgement_is_one_line_with_prompt_replies_sources_time_and_reviewer(run):
    feedback.record_thumb(run, PROMPT, "Unplug it for ten seconds.", up=True, reviewer="Ana")
    feedback.record_edit(run, PROMPT, "Dunno.", "Unplug it for ten seconds. Happy to help!")
    feedback.record_vote(run, PROMPT, {"source": "base", "text": "Try again."},
                         {"source": "tuned", "text": "Unplug it. Happy to help!"}, "B", reviewer="Ben")
    lines = run.feedback_file.read_text().splitlines()
    assert len(lines) == 3
    thumb, edit, vote = (json.loads(line) for line in lines)
    assert thumb["prompt"] == PROMPT and thumb["judgement"] == {"thumb": "up"} and thumb["reviewer"] == "Ana"
    assert thumb["replies"] == [{"source": "tuned", "text": "Unplug it for ten seconds."}]
    assert edit["judgement"]["edited"].endswith("Happy to help!") and edit["reviewer"] is None
    assert vote["judgement"] == {"choice": "B", "a": "base", "b": "tuned"}
    assert all(r["time"].startswith("20") for r in (thumb, edit, vote))


def test_an_edit_is_chosen_and_the_models_reply_rejected_a_vote_makes_winner_chosen(run):
    feedback.record_edit(run, PROMPT, "Dunno.", "Unplug it. Happy to help!")
    feedback.record_vote(run, PROMPT, {"source": "tuned", "text": "X"}, {"source": "base", "text": "Y"}, "B")
    feedback.record_vote(run, PROMPT, {"source": "tuned", "text": "X"}, {"source": "base", "text": "Y"}, "both bad")
    feedback.record_thumb(run, PROMPT, "Z", up=False)
    got = feedback.pairs(run)
    assert got == [
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Unplug it. Happy to help!"}],
         "rejected": [{"role": "assistant", "content": "Dunno."}]},
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Y"}],
         "rejected": [{"role": "assistant", "content": "X"}]},
    ]
    assert feedback.unpaired(run) == [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Z"}],
                                       "label": False}]


@pytest.mark.parametrize("call, message", [
    (lambda r: feedback.record_edit(r, PROMPT, "Same.", "Same."), "same as the model's reply"),
    (lambda r: feedback.record_edit(r, PROMPT, "Dunno.", "  "), "empty"),
    (lambda r: feedback.record_vote(r, PROMPT, {"source": "a", "text": "x"}, {"source": "b", "text": "y"}, "C"),
     "both bad"),
    (lambda r: feedback.record_thumb(r, [{"role": "user", "content": ""}], "x", up=True), "must not be empty"),
])
def test_bad_judgements_are_refused_with_the_fix_and_write_nothing(run, call, message):
    with pytest.raises(TunerError, match=message):
        call(run)
    assert feedback.records(run) == []


def test_blind_pair_hides_sources_until_the_vote_then_reveals_and_records(run):
    orders = set()
    for seed in range(20):
        pair = feedback.blind_pair(PROMPT[-1:], {"tuned": "T reply", "base": "B reply"}, random.Random(seed))
        orders.add(pair.shown)
    assert orders == {("T reply", "B reply"), ("B reply", "T reply")}  # both orders occur
    pair = feedback.blind_pair(PROMPT, {"tuned": "T reply", "base": "B reply"}, random.Random(1))
    assert "source" not in json.dumps(pair.shown)
    pick = "A" if pair.shown[0] == "T reply" else "B"
    revealed = pair.vote(run, pick, reviewer="Ana")
    assert revealed["winner"] == "tuned" and {revealed["A"], revealed["B"]} == {"tuned", "base"}
    with pytest.raises(TunerError, match="already has a vote"):
        pair.vote(run, "A")
    assert feedback.pairs(run)[0]["chosen"][0]["content"] == "T reply"


def test_report_counts_win_rates_with_wilson_interval_and_prompts_the_tuned_bot_lost(run):
    for i in range(8):
        feedback.record_vote(run, [{"role": "user", "content": f"q{i}"}], {"source": "tuned", "text": "t"},
                             {"source": "base", "text": "b"}, "A")
    feedback.record_vote(run, [{"role": "user", "content": "lost one"}], {"source": "base", "text": "b"},
                         {"source": "tuned", "text": "t"}, "A")
    feedback.record_vote(run, [{"role": "user", "content": "nobody"}], {"source": "base", "text": "b"},
                         {"source": "tuned", "text": "t"}, "both bad")
    feedback.record_thumb(run, PROMPT, "x", up=True)
    rep = feedback.report(run)
    assert rep["counts"]["votes"] == 10 and rep["counts"]["both_bad"] == 1 and rep["counts"]["thumbs_up"] == 1
    tuned = rep["win_rates"]["tuned"]
    assert (tuned["wins"], tuned["votes"], tuned["rate"]) == (8, 10, 0.8)
    assert (tuned["low"], tuned["high"]) == (0.4902, 0.9433)  # Wilson 95% for 8 of 10
    assert rep["win_rates"]["base"]["wins"] == 1
    assert [x["prompt"] for x in rep["lost"]] == ["lost one", "nobody"]
    assert rep["pairs"] == 9 and not rep["enough"]
    assert "1 more" in rep["need"] and "at least 10" in rep["need"]


def test_too_few_pairs_names_how_many_more_are_needed():
    assert feedback.pairs_needed(3) == ("3 preference pairs so far; preference tuning needs at least 10: 7 more "
                                        "(an A/B vote for A or B, or an edited reply, makes one).")
    assert feedback.pairs_needed(feedback.MIN_PAIRS) is None


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"prompt": [{"role": "user", "content": "Where is my order?"}],
        "chosen": [{"role": "assistant", "content": "It left today. Happy to help!"}],
        "rejected": [{"role": "assistant", "content": "No idea."}]}


def test_bad_preference_lines_are_named_with_the_fix_and_every_valid_line_is_kept(tmp_path, run):
    path = _write(tmp_path / "prefs.jsonl", [
        json.dumps(GOOD),
        json.dumps({"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]}),  # 2: missing rejected
        json.dumps({**GOOD, "rejected": GOOD["chosen"]}),  # 3: identical
        json.dumps({**GOOD, "prompt": []}),  # 4: empty prompt
        "{not json",  # 5
        json.dumps({"prompt": "Plain text prompt?", "chosen": "A text reply.", "rejected": "Another."}),  # 6: ok
    ])
    found = feedback.read_pairs(path)
    assert [r["_line"] for r in found.rows] == [1, 6]
    assert found.rows[1]["chosen"] == [{"role": "assistant", "content": "A text reply."}]
    messages = [str(e) for e in found.errors]
    assert messages[0].startswith(f"{path}, line 2: missing field rejected. Fix:")
    assert messages[1].startswith(f"{path}, line 3: chosen and rejected are the same reply")
    assert messages[2].startswith(f"{path}, line 4: empty or malformed prompt. Fix:")
    assert messages[3].startswith(f"{path}, line 5: not valid JSON")
    with pytest.raises(DataError, match="4 bad line"):
        found.raise_errors()

    imported = feedback.import_pairs(run, path, reviewer="QA team")
    assert len(imported.errors) == 4
    assert feedback.strip_lines(found.rows) == feedback.pairs(run)  # both valid lines, as pairs, nothing lost
    assert feedback.report(run)["counts"]["imported"] == 2


def test_export_writes_trl_preference_jsonl_that_imports_back_unchanged(tmp_path, run):
    for i in range(3):
        feedback.record_edit(run, [{"role": "user", "content": f"question {i}"}], "meh", f"answer {i}. Happy to help!")
    out = tmp_path / "pairs.jsonl"
    assert feedback.export_pairs(run, out) == 3
    assert feedback.strip_lines(feedback.read_pairs(out).rows) == feedback.pairs(run)


def test_split_is_seeded_and_holds_some_out():
    rows = [{"i": i} for i in range(20)]
    train, held = feedback.split(rows, 0.2, seed=7)
    assert len(held) == 4 and len(train) == 16 and not {r["i"] for r in held} & {r["i"] for r in train}
    assert feedback.split(rows, 0.2, seed=7) == (train, held)
    assert feedback.split(rows, 0.2, seed=8) != (train, held)
