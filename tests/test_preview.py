"""The Data tab's preview: the first examples, their lengths in tokens, and the tokens the model learns from."""

from __future__ import annotations

import json

from tuner import preview


def _data(tmp_path, n: int) -> str:
    rows = [{"messages": [{"role": "system", "content": "You are the Tea Crew."},
                          {"role": "user", "content": f"Is tin {i} back?" + " really" * (i * 8)},
                          {"role": "assistant", "content": f"Tin {i} is back on Monday. Cheers!"}]} for i in range(n)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    return str(tmp_path)


def test_examples_histogram_and_learned_tokens(tmp_path, tokenizer):
    data = _data(tmp_path, 12)
    examples = preview.read_examples(data)
    assert len(examples) == 12 and examples[0][1]["content"].startswith("Is tin 2 back?")
    assert preview.system_of(examples[0]) == "You are the Tea Crew." and preview.system_of([]) == ""
    assert preview.read_examples(None) == [] and len(preview.read_examples(data, limit=3)) == 3

    bins = preview.length_histogram(data, "default")
    assert sum(n for _, n in bins) == 12  # every example lands in one bin
    lows = [int(label.split("-")[0]) for label, _ in bins]
    assert lows == sorted(lows) and len(bins) > 1  # numeric order, empty bins kept between

    spans = preview.trained_tokens(examples[0], "default")
    learned = [text for text, mark in spans if mark == "learned"]
    assert learned == ["Tin 2 is back on Monday. Cheers!<|im_end|>"]  # the reply and its end-of-turn, nothing else
    assert "".join(text for text, _ in spans).count("Is tin 2 back?") == 1
    assert preview.length_histogram(tmp_path / "empty", "default") == []
