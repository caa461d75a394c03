"""Evaluation: base vs tuned on held-out prompts, voice metrics, forgetting check, eval files."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SIGN_OFF

from tuner.config import GenerationConfig
from tuner.errors import DataError
from tuner.evaluate import METRIC_HELP, general_texts, load_cases


def test_general_text_set_ships_with_the_package():
    texts = general_texts()
    assert 30 <= len(texts) <= 60
    assert all(len(t.split()) > 25 for t in texts)


def test_prompts_files_and_their_errors(signoff_run, tmp_path):
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps(["Where is my lamp?", {"prompt": "Refund?", "reference": "Sure | thing."}]))
    cases = load_cases(signoff_run, good, None)
    assert [c["messages"][-1]["content"] for c in cases] == ["Where is my lamp?", "Refund?"]
    assert [c["reference"] for c in cases] == [None, "Sure | thing."]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"prompts.jsonl, line 2"):
        load_cases(signoff_run, lines, None)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"prompt": "not a list"}))
    with pytest.raises(DataError, match="JSON list"):
        load_cases(signoff_run, wrong, None)
    # the validation split: prompt = the turns before the last reply, reference = that reply
    split = load_cases(signoff_run, None, 3)
    assert len(split) == 3 and all(SIGN_OFF in c["reference"] for c in split)
    assert all(c["messages"][-1]["role"] == "user" for c in split)


def test_evaluate_shows_the_voice_was_learned_and_what_it_cost(signoff_run):
    from tuner.evaluate import evaluate

    heard: list[tuple[int, int, str]] = []
    result = evaluate(signoff_run, settings=GenerationConfig(max_new_tokens=32), limit=3,
                      on_progress=lambda done, total, text: heard.append((done, total, text)))
    rows, metrics = result["rows"], result["metrics"]
    assert len(rows) == 3
    # progress says n of N prompts before the replies and after them, then the scoring
    assert heard[0] == (0, 3, "Base and tuned answer prompts 1-3 of 3")
    assert heard[1][:2] == (3, 3) and "answered" in heard[1][2]
    assert all(set(r) == {"prompt", "reference", "base", "tuned"} for r in rows)
    assert all(r["reference"] and SIGN_OFF in r["reference"] for r in rows)
    assert any(p["phrase"] == SIGN_OFF and p["position"] == "sign-off" for p in result["phrases"])

    assert set(metrics) == set(METRIC_HELP) and all(m["explain"] for m in metrics.values())
    assert metrics["brand_phrase_rate"]["tuned"] > metrics["brand_phrase_rate"]["base"]
    assert metrics["brand_phrase_rate"]["reference"] == 1.0
    assert metrics["chrf"]["tuned"] > metrics["chrf"]["base"]
    assert metrics["validation_loss"]["tuned"] < metrics["validation_loss"]["base"]
    for column in ("base", "tuned"):
        ppl = metrics["general_perplexity"][column]
        assert math.isfinite(ppl) and ppl > 1
        assert metrics["length_words"][column]["median"] > 0

    saved = json.loads((signoff_run / "eval.json").read_text())
    assert saved["rows"] == rows
    md = (signoff_run / "eval.md").read_text()
    assert "| brand_phrase_rate |" in md and rows[0]["prompt"] in md and SIGN_OFF in md


def test_each_prompt_is_evaluated_once_and_a_stop_writes_nothing(signoff_run, tmp_path):
    import threading

    from tuner.evaluate import Stopped, evaluate

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Refund?", " Refund? ", {"prompt": "Refund?", "reference": "Sure."}, "Where?"]))
    assert [c["messages"][-1]["content"] for c in load_cases(signoff_run, prompts, None)] == ["Refund?", "Where?"]
    before = (signoff_run / "eval.json").read_bytes() if (signoff_run / "eval.json").is_file() else None
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        evaluate(signoff_run, prompts, GenerationConfig(max_new_tokens=8), stop=stop)
    after = (signoff_run / "eval.json").read_bytes() if (signoff_run / "eval.json").is_file() else None
    assert after == before


def test_eval_cli_prints_rows_and_metrics_for_a_prompts_file(signoff_run, tmp_path, capsys):
    from tuner.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Do you sell gift cards?", {"prompt": "My lamp | is broken", "reference": None}]))
    code = main(["eval", "--run", str(signoff_run), "--prompts", str(prompts), "--json", "--max-new-tokens", "24"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in out["rows"]] == ["Do you sell gift cards?", "My lamp | is broken"]
    assert all(r["reference"] is None and r["base"] and r["tuned"] for r in out["rows"])
    assert out["metrics"]["chrf"]["tuned"] is None  # nothing to compare with
    assert "My lamp \\| is broken" in (signoff_run / "eval.md").read_text()
