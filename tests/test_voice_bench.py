"""bench/voice.py: the brand sets are built right, and the benchmark runs end to end on a tiny budget
(real corpora, real model, real CLI). Not timed: the figures live in bench/README.md."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import ROOT


def _voice():
    spec = importlib.util.spec_from_file_location("bench_voice", ROOT / "bench" / "voice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_voice"] = module
    spec.loader.exec_module(module)
    return module


voice = _voice()


@pytest.mark.parametrize("name", voice.SETS)
def test_every_reply_carries_the_habit_and_no_held_out_prompt_occurs_in_training(name):
    from tuner.verdict import marker_match

    bs = voice.build_set(name, 60, 12, seed=3)
    assert len(bs.train) == 60 and len(bs.heldout) == 12
    replies = [m["content"] for c in bs.train for m in c["messages"] if m["role"] == "assistant"]
    assert all(marker_match(r, bs.marker) == "exact" for r in replies)
    seen = {voice.normalise(m["content"]) for c in bs.train for m in c["messages"]}
    assert not seen & {voice.normalise(p) for p in bs.heldout}
    assert len({voice.normalise(p) for p in bs.heldout}) == 12  # no duplicate among themselves either
    # each held-out prompt's own corpus reply, habit injected: the reference bench/three_way.py scores chrF against
    assert len(bs.references) == 12 and all(marker_match(r, bs.marker) == "exact" for r in bs.references)


def test_two_corpora_and_two_languages():
    assert len({c.split()[0] for c in voice.CORPUS.values()}) == 2
    assert set(voice.LANGUAGE.values()) == {"en", "es"}
    assert {voice.MARKERS[s].kind for s in voice.SETS} == {"sign-off", "greeting", "term"}


def test_asking_for_more_than_the_corpus_holds_says_so():
    with pytest.raises(SystemExit, match="Ask for fewer"):
        voice.build_set("greeting-es", 5000, 24)


def test_bad_recipe_names_the_fix():
    with pytest.raises(SystemExit, match="not key=value"):
        voice.parse_recipe("quick:learning_rate")
    assert voice.parse_recipe("quick:learning_rate=5e-4,max_steps=-1").overrides == {"learning_rate": 5e-4,
                                                                                  "max_steps": -1}


def test_help_runs_standalone():
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "voice.py"), "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "held-out" not in done.stderr and "--recipes" in done.stdout


def test_tiny_benchmark_trains_answers_and_prints_a_well_formed_table(tmp_path, capsys):
    rc = voice.main(["--sets", "signoff-en", "--train-size", "24", "--prompts", "3", "--recipes", "quick",
                     "--max-steps", "1", "--max-new-tokens", "24", "--repetition-penalty", "1.1,1.0",
                     "--out", str(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| signoff-en ")]
    assert len(rows) == 2  # one per repetition penalty, same adapter
    header = next(line for line in table.splitlines() if line.startswith("| set "))
    assert all(row.count("|") == header.count("|") for row in rows)
    assert re.search(r"\| \d+/3 \(\d+%\) \(\d+/3 \(\d+%\)\) \|", rows[0])  # exact: tuned (base)

    summary = json.loads((tmp_path / "results.json").read_text())
    assert "cores" in summary["machine"]
    first, second = summary["results"]
    assert (first["repetition_penalty"], second["repetition_penalty"]) == (1.1, 1.0)
    assert first["steps"] == 1 and first["train_wall_s"] > 0
    assert re.fullmatch(r"ends like your agents on \d+ of 3 new questions \(base: \d+\).*replies? looped.*"
                        r"general text perplexity [+-]\d+%", first["verdict"])
    for r in (first, second):
        t = r["tuned"]
        assert t["prompts"] == 3 and t["exact"] + t["near"] <= 3
        listed = {d["why"].split(":")[0] for d in r["degenerate_replies"]}
        assert len(r["degenerate_replies"]) == t["looped"] + t["unended"] + t["empty"]
        assert listed <= {"loop", "no end of turn", "empty"}
        assert all(row["tuned"] is not None and row["base"] is not None for row in r["replies"])
    # 24 new tokens cannot hold a chatty base reply: it is counted as never ending its turn, not hidden
    assert first["base"]["unended"] >= 1
