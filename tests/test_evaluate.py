"""Evaluation: prompting vs retrieval vs tuning on held-out prompts, voice metrics, forgetting check, eval files."""

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


def test_closeness_to_the_agents_is_scored_without_the_habit():
    """The field report: replies empty of help but carrying the sign-off. Left in, the sign-off alone made them
    score as close to the agents' answers; taken out, the help decides."""
    from tuner.evaluate import chrf
    from tuner.verdict import Marker

    agents = [f"Unplug the router for ten seconds, then reconnect. {SIGN_OFF}",
              f"Your refund reaches the card in 3-5 working days. {SIGN_OFF}"]
    empty = [f"I'm sorry for the inconvenience. {SIGN_OFF}", f"Check your internet connection. {SIGN_OFF}"]
    helpful = ["Unplug the router for ten seconds and reconnect it.", "The refund reaches your card in 3-5 days."]
    marker = Marker("sign-off", SIGN_OFF)
    assert chrf(empty, agents) > chrf(helpful, agents)  # what the old score said
    assert chrf(empty, agents, marker) < 20 < chrf(helpful, agents, marker)
    # a house term is a word of the content: it stays
    term = Marker("term", "grand", common="good")
    assert chrf(["a grand day"], ["a grand day"], term) == 100.0


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


def test_evaluate_compares_prompting_retrieval_and_tuning_and_what_each_cost(signoff_run):
    from tuner.evaluate import COLUMNS, chrf, evaluate
    from tuner.retrieve import RETRIEVE_K
    from tuner.verdict import Marker, Way, ship_sentence

    heard: list[tuple[int, int, str]] = []
    result = evaluate(signoff_run, settings=GenerationConfig(max_new_tokens=32), limit=3,
                      on_progress=lambda done, total, text: heard.append((done, total, text)))
    rows, metrics, three = result["rows"], result["metrics"], result["three_way"]
    assert len(rows) == 3
    # progress says n of N prompts before the replies and after them, then the scoring
    assert heard[0] == (0, 3, "Base, retrieved and tuned answer prompts 1-3 of 3")
    assert heard[1][:2] == (3, 3) and "answered" in heard[1][2]
    assert all(set(r) == {"prompt", "reference", "base", "retrieved", "tuned"} for r in rows)
    assert all(r["base"] and r["retrieved"] and r["tuned"] for r in rows)
    assert all(r["reference"] and SIGN_OFF in r["reference"] for r in rows)
    assert any(p["phrase"] == SIGN_OFF and p["position"] == "sign-off" for p in result["phrases"])

    assert set(metrics) == set(METRIC_HELP) and all(m["explain"] for m in metrics.values())
    # the habit, counted per way on the same replies the rows show
    for col in COLUMNS:
        assert metrics["habit"][col] == {"count": sum(r[col].strip().endswith(SIGN_OFF) for r in rows), "of": 3}
        assert 0 <= metrics["degenerate"][col] <= 3 and metrics["seconds_per_reply"][col] > 0
        assert metrics["length_words"][col]["median"] > 0
    assert metrics["habit"]["tuned"]["count"] >= 2 and metrics["habit"]["reference"] == {"count": 3, "of": 3}
    assert metrics["brand_phrase_rate"]["reference"] == 1.0
    # closeness to the agents' replies is scored on their content: the sign-off, taken out of both, earns nothing
    refs = [r["reference"] for r in rows]
    for col in ("base", "retrieved", "tuned"):
        assert metrics["chrf"][col] == chrf([r[col] for r in rows], refs, Marker("sign-off", SIGN_OFF))
    assert metrics["chrf"]["tuned"] < chrf([r["tuned"] for r in rows], refs)
    # retrieval reads k training conversations more on every reply; the tuned model only the question
    assert metrics["prompt_tokens"]["retrieved"] > metrics["prompt_tokens"]["base"] > metrics["prompt_tokens"]["tuned"]
    assert three["k"] == RETRIEVE_K
    assert three["added_prompt_tokens"] == round(metrics["prompt_tokens"]["retrieved"] - metrics["prompt_tokens"]["base"], 1)
    # losses score weights: adapter off and on; the brief and the examples change no weight
    assert metrics["validation_loss"]["tuned"] < metrics["validation_loss"]["base"]
    assert metrics["validation_loss"].get("retrieved") is None
    for column in ("base", "tuned"):
        ppl = metrics["general_perplexity"][column]
        assert math.isfinite(ppl) and ppl > 1

    # the sentence is the one the measured numbers give, with them in it
    ways = [Way(name, 3, metrics["habit"][col]["count"], metrics["degenerate"][col], metrics["chrf"][col],
                metrics["length_words"][col]["median"], metrics["seconds_per_reply"][col], metrics["prompt_tokens"][col])
            for col, name in zip(COLUMNS, ("prompting", "retrieval", "tuning"), strict=True)]
    assert three["sentence"] == ship_sentence(*ways, habit="the sign-off",
                                              agents_words=metrics["length_words"]["reference"]["median"])
    assert f"{metrics['habit']['tuned']['count']} " in three["sentence"]

    saved = json.loads((signoff_run / "eval.json").read_text())
    assert saved["rows"] == rows and saved["three_way"] == three
    md = (signoff_run / "eval.md").read_text()
    assert "| habit |" in md and rows[0]["prompt"] in md and SIGN_OFF in md and three["sentence"] in md
    assert "| base + brand brief | retrieved examples | tuned |" in md


def test_the_retrieved_column_reads_training_conversations_and_counts_their_tokens(signoff_run):
    from tuner.messages import read_examples
    from tuner.playground import PROMPTED, RETRIEVED, TUNED, Playground
    from tuner.runs import Run

    pg = Playground()
    info = pg.load_run(signoff_run)
    cases = load_cases(signoff_run, None, 2)
    train_users = {m["content"] for r in read_examples(Run(signoff_run).data_file("train.jsonl"))
                   for m in r["messages"] if m["role"] == "user"}
    val_users = {m["content"] for r in read_examples(Run(signoff_run).data_file("validation.jsonl"))
                 for m in r["messages"] if m["role"] == "user"}
    assert not train_users & val_users
    settings = GenerationConfig(max_new_tokens=8)
    prompts = pg.prompt_texts([c["messages"] for c in cases], RETRIEVED, settings, signoff_run, k=2)
    for case, text in zip(cases, prompts, strict=True):
        question = case["messages"][-1]["content"]
        assert info.brand_brief in text  # told the brief, as the prompt-only column
        shown = {u for u in train_users if u in text}
        assert len(shown) == 2 and {u for u in val_users if u in text} == {question}  # 2 examples, no held-out one
        assert text.rindex(question) > max(text.index(u) for u in shown)  # the examples come before the question
    replies = pg.generate_replies([c["messages"] for c in cases], [PROMPTED, RETRIEVED, TUNED], settings,
                                  signoff_run, k=2)
    for reply, text in zip(replies, prompts, strict=True):
        assert reply[RETRIEVED].prompt_tokens == len(pg.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert reply[RETRIEVED].prompt_tokens > reply[PROMPTED].prompt_tokens + 20
        assert all(r.seconds > 0 and 0 < r.new_tokens <= 8 for r in reply.values())


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
    code = main(["eval", "--run", str(signoff_run), "--prompts", str(prompts), "--json", "--max-new-tokens", "24",
                 "--examples", "2"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in out["rows"]] == ["Do you sell gift cards?", "My lamp | is broken"]
    assert all(r["reference"] is None and r["base"] and r["retrieved"] and r["tuned"] for r in out["rows"])
    assert out["metrics"]["chrf"]["tuned"] is None  # nothing to compare with
    assert out["three_way"]["k"] == 2 and "chrF" not in out["three_way"]["sentence"]
    assert "My lamp \\| is broken" in (signoff_run / "eval.md").read_text()
