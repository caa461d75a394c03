"""The run's examples as the trainer will see them: tokenized with the training template, checked, sampled."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tuner.messages import read_examples
from tuner.runs import Run


def trained_turns(messages: list[dict[str, Any]]) -> int:
    """Assistant turns that carry loss (the OpenAI format's `weight: 0` turns do not)."""
    return sum(1 for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0)


def inspect_examples(rows: list[dict[str, Any]], tokenizer, chat_template: str | None, max_length: int,
                     file: str = "train.jsonl") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenize each example as the trainer will and drop those that would train nothing.

    An example is dropped when it has no assistant reply to learn from, or when its replies all lie
    beyond `max_length` (truncation keeps the start). Returns (kept rows, statistics with a
    `dropped` list naming file and line).
    """
    kept, dropped = [], []
    tokens = trained = truncated = longest = 0
    for row in rows:
        where = {"file": file, "line": row.get("_line")}
        if chat_template is not None and trained_turns(row["messages"]) == 0:
            dropped.append({**where, "reason": "no assistant reply to learn from"})
            continue
        out = tokenizer.apply_chat_template(row["messages"], chat_template=chat_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=chat_template is not None)
        ids = out["input_ids"]
        mask = out["assistant_masks"] if chat_template is not None else [1] * len(ids)
        if len(ids) > max_length:
            truncated += 1
        n_trained = sum(mask[:max_length])
        if n_trained == 0:
            dropped.append({**where, "reason": f"every reply lies beyond max_length={max_length} tokens"})
            continue
        tokens += min(len(ids), max_length)
        longest = max(longest, min(len(ids), max_length))
        trained += n_trained
        kept.append(row)
    stats = {"examples": len(kept), "tokens": tokens, "trained_tokens": trained, "truncated": truncated,
             "longest": longest, "dropped": dropped}
    return kept, stats


def load_split(run_dir: Path, name: str, tokenizer, template: str | None, max_length: int):
    path = Run(run_dir).data_file(name)
    rows = read_examples(path) if path.is_file() else []
    return inspect_examples(rows, tokenizer, template, max_length, file=name)


def eval_sample(dataset, limit: int, seed: int):
    """The validation examples scored during training: all, or a fixed seeded sample of `limit`; in length
    order, since batches of similar length pad least (the order of validation examples means nothing)."""
    indices = list(range(len(dataset)))
    if 0 < limit < len(indices):
        indices = random.Random(seed).sample(indices, limit)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(indices, key=lambda i: -lengths[i]))
