"""What the Data tab shows about converted examples: the first few, their token lengths, the learned tokens.

Reads the converter's output folder (train.jsonl, validation.jsonl) and tokenizes with the base
model's own tokenizer and training template, so the preview is what training will see. Light
at import time: transformers is loaded by the first call that needs a tokenizer.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from tuner.messages import iter_jsonl

PREVIEW_EXAMPLES = 20  # examples the Data tab can preview
HISTOGRAM_EXAMPLES = 50_000  # examples measured for the length histogram
HISTOGRAM_BINS = 12  # about a dozen round-numbered bins
SPLIT_FILES = ("train.jsonl", "validation.jsonl")

Message = dict[str, str]


@functools.lru_cache(maxsize=2)
def tokenizer_for(base_model: str) -> Any:
    """Tokenizers are shared, read-only model files: cached per process, never per user."""
    from tuner.models import load_tokenizer

    return load_tokenizer(base_model or "default")


def read_examples(data_dir: str | Path | None, limit: int = PREVIEW_EXAMPLES,
                  files: tuple[str, ...] = SPLIT_FILES) -> list[list[Message]]:
    """The first converted examples (their messages), for the preview and the histogram."""
    out: list[list[Message]] = []
    for name in files if data_dir else ():
        path = Path(data_dir) / name
        if not path.is_file():
            continue
        for _, row in iter_jsonl(path):
            if len(out) >= limit:
                return out
            out.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
    return out


def length_histogram(data_dir: str | Path | None, base_model: str) -> list[tuple[str, int]]:
    """Examples per token-length bin (chat template included): [("64-127", 12), ...] in numeric order.

    Every bin between the shortest and the longest example is listed, empty ones included.
    """
    from tuner.dataset import token_lengths

    convs = read_examples(data_dir, limit=HISTOGRAM_EXAMPLES)
    if not convs:
        return []
    tok = tokenizer_for(base_model)
    lengths = token_lengths(tok, tok.apply_chat_template(convs, tokenize=False))
    low, top = min(lengths), max(lengths)
    width = max(8, 2 ** math.ceil(math.log2(max((top - low) / HISTOGRAM_BINS, 1))))
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // width] = counts.get(n // width, 0) + 1
    return [(f"{b * width}-{(b + 1) * width - 1}", counts.get(b, 0)) for b in range(low // width, top // width + 1)]


def system_of(messages: list[Message]) -> str:
    """The example's system prompt ("" when it has none)."""
    return next((m["content"] for m in messages if m["role"] == "system"), "")


def trained_tokens(messages: list[Message], base_model: str) -> list[tuple[str, str | None]]:
    """The example as the model reads it, in spans; the tokens it learns from are marked "learned"."""
    from tuner.templates import assistant_mask

    tok = tokenizer_for(base_model)
    ids, mask = assistant_mask(tok, messages)
    spans: list[tuple[str, str | None]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            spans.append((tok.decode(ids[start:i]), "learned" if mask[start] else None))
            start = i
    return spans
