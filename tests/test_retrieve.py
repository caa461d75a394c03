"""tuner.retrieve: the retrieved column's examples come from the training conversations only, most alike first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tuner.errors import DataError
from tuner.retrieve import ExampleIndex, Exchange, exchanges


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_examples_come_from_training_conversations_never_the_held_out_ones(signoff_data):
    train, val = _lines(signoff_data / "train.jsonl"), _lines(signoff_data / "validation.jsonl")
    index = ExampleIndex.from_file(signoff_data / "train.jsonl")
    assert len(index.items) == len(train)  # one exchange per training chat, each indexed
    train_turns = {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in train}
    val_users = {r["messages"][0]["content"] for r in val}
    for row in val:
        question = row["messages"][0]["content"]  # "Hi, where is my order (case 43)."
        topic = question.removeprefix("Hi, ").split(" (case")[0]
        found = index.nearest(question, k=3)
        assert len(found) == 3 and len({e.line for e in found}) == 3  # three different conversations
        for ex in found:
            assert (ex.user, ex.reply) == tuple(m["content"] for m in train[ex.line - 1]["messages"][:2])
            assert (ex.user, ex.reply) in train_turns and ex.user not in val_users
        # the most alike is a training chat about the same topic, when training has one
        if any(topic in u for u, _ in train_turns):
            assert topic in found[0].user, (question, found[0].user)


def test_examples_are_chat_turns_with_the_closest_right_before_the_question():
    index = ExampleIndex([Exchange(1, "Can I return a bulb?", "Returns are free for 30 days."),
                          Exchange(2, "Where is my order?", "It left today."),
                          Exchange(3, "Where is my parcel order now?", "Tracking is in your e-mail."),
                          Exchange(3, "Thanks, and my order number?", "It is in the e-mail too.")])
    assert [e.line for e in index.nearest("where is my order", 2)] == [2, 3]  # one exchange per conversation
    turns = index.examples("where is my order", 2)
    assert [m["role"] for m in turns] == ["user", "assistant"] * 2
    assert turns[-2:] == [{"role": "user", "content": "Where is my order?"},
                          {"role": "assistant", "content": "It left today."}]
    # a question that shares no word with any still gets k examples (they show the voice), and k is capped
    assert len(index.nearest("???", 2)) == 2 and len(index.nearest("zebra", 10)) == 3
    assert index.nearest("where is my order", 0) == []


def test_exchanges_pair_each_user_turn_with_the_reply_right_after_it():
    row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                        {"role": "user", "content": "Really, bye"}, {"role": "assistant", "content": "See you!"},
                        {"role": "assistant", "content": "  "}]}
    assert exchanges([(7, row)]) == [Exchange(7, "Hi", "Hello!"), Exchange(7, "Really, bye", "See you!")]


def test_no_training_file_or_no_reply_says_what_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl.*no training file"):
        ExampleIndex.from_file(tmp_path / "train.jsonl")
    only_questions = tmp_path / "questions.jsonl"
    only_questions.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"}]}) + "\n")
    with pytest.raises(DataError, match=r"questions.jsonl.*no exchange"):
        ExampleIndex.from_file(only_questions)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"messages": \n')
    with pytest.raises(DataError, match=r"broken.jsonl, line 2"):
        ExampleIndex.from_file(broken)


def test_retrieval_is_a_light_module():
    code = "import sys, tuner.retrieve, tuner.verdict, tuner.voice; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
