"""The run's examples as the trainer will see them: tokenized with the model's template and the loss mask
(tuner.templates), checked, sampled."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tuner.messages import read_examples
from tuner.runs import Run
from tuner.templates import assistant_mask


def trained_turns(messages: list[dict[str, Any]]) -> int:
    """Assistant turns that carry loss (the OpenAI format's `weight: 0` turns do not)."""
    return sum(1 for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0)


def encode(tokenizer, messages: list[dict[str, Any]], assistant_only: bool) -> tuple[list[int], list[int]]:
    """(input_ids, mask) as the trainer sees the example: the mask marks the tokens that carry loss
    (the replies and their end-of-turn tokens, derived from the model's template; every token when
    `assistant_only` is off)."""
    if assistant_only:
        return assistant_mask(tokenizer, messages)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return list(ids), [1] * len(ids)


def inspect_examples(rows: list[dict[str, Any]], tokenizer, assistant_only: bool, max_length: int,
                     file: str = "train.jsonl") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenize each example as the trainer will and drop those that would train nothing.

    An example is dropped when it has no assistant reply to learn from, or when its replies all lie
    beyond `max_length` (truncation keeps the start). Returns (kept rows, each with its `input_ids`
    and `assistant_masks`, and statistics with a `dropped` list naming file and line).
    """
    kept, dropped = [], []
    tokens = trained = truncated = longest = 0
    for row in rows:
        where = {"file": file, "line": row.get("_line")}
        if assistant_only and trained_turns(row["messages"]) == 0:
            dropped.append({**where, "reason": "no assistant reply to learn from"})
            continue
        ids, mask = encode(tokenizer, row["messages"], assistant_only)
        if len(ids) > max_length:
            truncated += 1
        n_trained = sum(mask[:max_length])
        if n_trained == 0:
            dropped.append({**where, "reason": f"every reply lies beyond max_length={max_length} tokens"})
            continue
        tokens += min(len(ids), max_length)
        longest = max(longest, min(len(ids), max_length))
        trained += n_trained
        kept.append({**row, "input_ids": ids, "assistant_masks": mask})
    stats = {"examples": len(kept), "tokens": tokens, "trained_tokens": trained, "truncated": truncated,
             "longest": longest, "dropped": dropped}
    return kept, stats


def load_split(run_dir: Path, name: str, tokenizer, assistant_only: bool, max_length: int):
    path = Run(run_dir).data_file(name)
    rows = read_examples(path) if path.is_file() else []
    return inspect_examples(rows, tokenizer, assistant_only, max_length, file=name)


def eval_sample(dataset, limit: int, seed: int):
    """The validation examples scored during training: all, or a fixed seeded sample of `limit`; in length
    order, since batches of similar length pad least (the order of validation examples means nothing)."""
    indices = list(range(len(dataset)))
    if 0 < limit < len(indices):
        indices = random.Random(seed).sample(indices, limit)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(indices, key=lambda i: -lengths[i]))
