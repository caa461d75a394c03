"""Exports in, chat examples out: speakers -> roles, cleaning, validation report, PII, seeded split.

`convert(paths, out_dir, cfg)` streams every file through its parser (tuner.formats), cleans each
conversation, measures it with the base model's own tokenizer and chat template, and writes
`train.jsonl`, `validation.jsonl` (one {"messages": [...]} a line) and `report.json`, which says what
was kept, what was dropped (file, 1-based line, category, reason) and why. Each count has one unit:
conversations (read = kept + dropped) or the file's own rows (lines, records or CSV rows), and
`totals` sums the per-file columns for the headline. Advice is worded for the caller (`hints`).

What happens to a conversation, in order:
1. Speaker labels map to roles: the user's --assistant/--user names, then known labels (Agent,
   Support, Bot, ... -> assistant; Customer, User, Client, ... -> user; also as words in labels such
   as "Agent Rosa"). A conversation with a speaker nobody mapped is dropped as "unmapped speaker"
   (counted, and the label listed in the report so the user can map it); nothing is guessed.
2. Consecutive messages from one side merge into one turn.
3. A leading assistant greeting and a trailing user turn with no reply are trimmed (counted).
4. The system prompt (the brand brief) is added where there is none.
5. PII is counted and, with redact_pii, replaced by [EMAIL]-style placeholders.
6. Over max_length tokens: 'truncate' drops the last turns until it fits; 'drop' drops it.
7. The split hashes the conversation's normalized text with the seed, so duplicates and
   near-duplicates land on the same side and adding data never reshuffles old examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuner import limits
from tuner.config import ConvertConfig
from tuner.errors import DataError, TunerError
from tuner.formats import (
    COLUMN_GUESSES,
    FORMAT_HELP,
    NO_ASSISTANT,
    OVER_LIMIT,
    PARSERS,
    TOO_LONG,
    UNMAPPED_SPEAKER,
    UNREADABLE_FILE,
    UNRECOGNIZED_ROLE,
    Conversation,
    Dropped,
    Source,
    guess_columns,
    parse,
    resolve_format,
)
from tuner.pii import PII_WORDS
from tuner.progress import fmt_duration
from tuner.roles import _label, role_of
from tuner.words import agree, and_list, plural

# -- speakers -> roles ---------------------------------------------------------------------------------

# advice in reports names the fix as the caller's user meets it: command-line flags, or settings in words
HINTS: dict[str, dict[str, str]] = {
    "cli": {
        "map_speaker": "map each with --assistant NAME or --user NAME",
        "map_speakers": "Map them with --assistant NAME or --user NAME.",
        "map_role": "remove those messages or map the role with --assistant/--user",
        "overlong_drop": "overlong examples are dropped (--overlong drop)",
        "raise_max_length": "Raise --max-length or shorten the conversation",
        "lower_max_length": "Check them or lower --max-length.",
        "redact": "convert with redact_pii (--redact-pii) to replace it",
    },
    "page": {
        "map_speaker": "tick your team's speakers in the list on the left",
        "map_speakers": "Say which of them are your team to keep those conversations.",
        "map_role": "remove those messages or rename the role to system, user or assistant",
        "overlong_drop": "overlong examples are set to be dropped, not shortened",
        "raise_max_length": "Raise the maximum length or shorten the conversation",
        "lower_max_length": "Check them or lower the maximum length.",
        "redact": "turn on redaction of personal data to replace it",
    },
}



@lru_cache(maxsize=4096)
def _role_cached(label: str, strict: bool, assistant_names: tuple[str, ...], user_names: tuple[str, ...]) -> str | None:
    return role_of(label, strict, assistant_names, user_names)  # a file has few labels: map each once


@lru_cache(maxsize=4096)
def _given_name(label: str, names: tuple[str, ...]) -> str | None:
    """The name the user gave (--assistant/--user, the page's speaker list) that `label` is, if any."""
    key = _label(label)
    return next((n for n in names if _label(n) == key), None)


# -- cleaning one conversation ---------------------------------------------------------------------------


@dataclass
class _Counts:
    merged_messages: int = 0
    trimmed_greetings: int = 0
    trimmed_unanswered: int = 0
    system_prompt_added: int = 0
    named: set[str] = field(default_factory=set)  # names the user gave that some message's speaker matched


def clean(conv: Conversation, cfg: ConvertConfig, counts: _Counts | None = None,
          unmapped: Counter | None = None, hints: str = "cli") -> list[dict[str, Any]] | Dropped:
    """Roles mapped, sides merged, greeting and unanswered tail trimmed, system prompt added; or why not.

    `hints` words the fix in a drop reason: "cli" (flags) or "page" (settings in words), see HINTS.
    """
    counts = counts if counts is not None else _Counts()
    mapped: list[dict[str, Any]] = []
    unknown: list[str] = []
    names = (tuple(cfg.assistant_names), tuple(cfg.user_names))
    given = names[0] + names[1]
    for msg in conv.messages:
        role = _role_cached(msg["role"], conv.strict_roles, *names)
        if given and (name := _given_name(msg["role"], given)) is not None:
            counts.named.add(name)
        if role is None:
            if msg["role"] not in unknown:
                unknown.append(msg["role"])
            continue
        content = msg["content"].replace("\r\n", "\n").replace("\r", "\n").strip()
        item = {"role": role, "content": content}
        if "weight" in msg:
            item["weight"] = msg["weight"]
        if mapped and mapped[-1]["role"] == role:
            last = mapped[-1]
            last["content"] = f"{last['content']}\n{content}"
            if "weight" in last or "weight" in item:  # train on the merged turn if any part was trained
                last["weight"] = max(last.get("weight", 1), item.get("weight", 1))
            counts.merged_messages += 1
        else:
            mapped.append(item)
    if unknown:
        names, n = and_list(unknown, "'"), len(unknown)
        if conv.strict_roles:
            return Dropped(conv.file, conv.line, UNRECOGNIZED_ROLE,
                           f"{agree(n, 'role')} {names} {agree(n, 'is')} not system, user or assistant; "
                           f"{HINTS[hints]['map_role']}")
        if unmapped is not None:
            unmapped.update(unknown)
        labels = "a known agent or customer label" if n == 1 else "known agent or customer labels"
        return Dropped(conv.file, conv.line, UNMAPPED_SPEAKER,
                       f"{agree(n, 'speaker')} {names} {agree(n, 'is')} not {labels}; {HINTS[hints]['map_speaker']}")
    head = 0
    while head < len(mapped) and mapped[head]["role"] == "system":
        head += 1
    if head < len(mapped) and mapped[head]["role"] == "assistant":
        del mapped[head]  # merged already, so the whole greeting is one message
        counts.trimmed_greetings += 1
    if mapped and mapped[-1]["role"] == "user":
        mapped.pop()
        counts.trimmed_unanswered += 1
    if not any(m["role"] == "assistant" for m in mapped):
        sides = sorted({m["role"] for m in conv.messages})
        return Dropped(conv.file, conv.line, NO_ASSISTANT,
                       f"no assistant reply to a user message (speakers: {', '.join(sides)})")
    if cfg.system_prompt and mapped[0]["role"] != "system":
        mapped.insert(0, {"role": "system", "content": cfg.system_prompt})
        counts.system_prompt_added += 1
    return mapped


# -- measuring with the model's tokenizer and template ------------------------------------------------------


def _plain(backend: Any) -> bool:
    """Whether a fast tokenizer's Rust backend encodes text as it is. A batched call with padding=True or
    truncation=True (the playground's, the voice check's) leaves padding or truncation switched on in the backend
    until the next call through the Python tokenizer: counted there, every text would measure the longest."""
    return (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
            and backend.padding is None)


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of many texts in one batch call (no special tokens added: templates carry their own)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if _plain(backend):
        # the Rust batch encoder without offsets: ~1.5x faster, same ids
        return [len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(x) for x in ids]


class TokenCounter:
    """Exact token counts from the model's fast tokenizer, each distinct piece of text encoded once.

    A fast tokenizer cuts its input at added tokens (`<|im_start|>`, `<|im_end|>`) before normalizing and
    pre-tokenizing, so a rendered chat's count is the number of added tokens plus the counts of the pieces
    between them. Role headers, the template's default system prompt and canned replies then cost one
    encoding per distinct text, not one per conversation. The first call checks the sum against whole-text
    encoding and falls back to that if a tokenizer does not split this way (e.g. Metaspace "first").

    >>> # TokenCounter(tokenizer).count(["<|im_start|>user\\nhi<|im_end|>\\n"])  ->  [6]
    """

    CACHE_ENTRIES = 50_000  # distinct pieces remembered across batches (then forgotten all at once)
    CACHE_CHARS = 1_000  # longer pieces are counted but not remembered, so the cache stays a few tens of MB

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}
        self.split: re.Pattern[str] | None = None
        self.checked = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not _plain(backend):
            return
        added = list(backend.get_added_tokens_decoder().values())
        # tokens that eat neighbouring spaces or match only whole words do not cut text cleanly
        if added and all(not (t.lstrip or t.rstrip or t.single_word) for t in added):
            longest_first = sorted({t.content for t in added}, key=len, reverse=True)
            self.split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
            self.encode = backend.encode_batch_fast

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of `texts`, as `token_lengths` gives them."""
        if self.split is None or not texts:
            return token_lengths(self.tokenizer, texts)
        parts = [self.split.split(text) for text in texts]
        cache = self.cache
        new = list(dict.fromkeys(p for ps in parts for p in ps[::2] if p and p not in cache))
        found = dict(zip(new, (len(e.ids) for e in self.encode(new, add_special_tokens=False)), strict=True))
        counts = [len(ps) // 2 + sum(cache[p] if p in cache else found[p] for p in ps[::2] if p) for ps in parts]
        if not self.checked:
            self.checked = True
            if counts != token_lengths(self.tokenizer, texts):
                self.split = None
                return token_lengths(self.tokenizer, texts)
        if len(cache) + len(found) > self.CACHE_ENTRIES:
            cache.clear()
        cache.update((p, n) for p, n in found.items() if len(p) <= self.CACHE_CHARS)
        return counts


def _render(tokenizer: Any, conversations: list[list[dict[str, Any]]]) -> list[str]:
    plain = [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in conversations]
    return tokenizer.apply_chat_template(plain, tokenize=False)


class Renderer:
    """The model's chat template over plain messages, as `apply_chat_template(tokenize=False)` renders it.

    transformers' own Jinja renderer is called directly, which skips the per-message normalization
    (a third of the time on plain {"role", "content"} dicts); the first batch is checked against
    `apply_chat_template`, and any difference or error keeps that path instead.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.direct: Callable[[list[list[dict[str, Any]]]], list[str]] | None = None
        self.checked = False
        try:
            from transformers.utils.chat_template_utils import render_jinja_template

            template = tokenizer.get_chat_template()
            specials = dict(tokenizer.special_tokens_map)
            self.direct = lambda convs: render_jinja_template(conversations=convs, chat_template=template,
                                                              **specials)[0]
        except (ImportError, AttributeError, ValueError, TypeError):
            pass

    def render(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        if self.direct is not None:
            plain = [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in conversations]
            try:
                texts = self.direct(plain)
            except Exception:  # noqa: BLE001 - any failure of the shortcut means: use the public path
                texts = None
            if not self.checked or texts is None:
                self.checked = True
                reference = _render(self.tokenizer, conversations)
                if texts != reference:
                    self.direct = None
                return reference
            return texts
        return _render(self.tokenizer, conversations)


def _summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"total": 0, "min": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"total": sum(ordered), "min": ordered[0], "median": median,
            "p95": ordered[max(0, math.ceil(0.95 * n) - 1)], "max": ordered[-1]}


_SKELETON = re.compile(r"[\W\d_]+")


MEMO_ENTRIES = 20_000  # distinct message texts whose PII scan and duplicate forms are remembered
MEMO_CHARS = 1_000  # longer texts are not remembered (bounds the memos to a few tens of MB)


def _remember(memo: dict, key: str, value: Any) -> Any:
    """Store `value` under `key` in a bounded memo (forgotten all at once when full); returns `value`."""
    if len(key) <= MEMO_CHARS:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[key] = value
    return value


def _forms(content: str) -> tuple[str, str]:
    """A message's text as the exact key sees it (case and spacing folded) and as the near key sees it."""
    folded = content.casefold()
    return " ".join(folded.split()), _SKELETON.sub(" ", folded).strip()


def _keys(messages: list[dict[str, Any]], memo: dict[str, tuple[str, str]] | None = None) -> tuple[int, int]:
    """(exact, near) 64-bit duplicate keys; near ignores case, digits, punctuation and spacing (ids, dates).

    `memo` remembers each message text's folded forms: canned replies recur in most exports.
    """
    exact_parts, near_parts = [], []
    for m in messages:
        if m["role"] == "system":
            continue
        content = m["content"]
        forms = memo.get(content) if memo is not None else None
        if forms is None:
            forms = _forms(content) if memo is None else _remember(memo, content, _forms(content))
        exact_parts.append(f"{m['role']}\x1f{forms[0]}")
        near_parts.append(f"{m['role']}\x1f{forms[1]}")
    return (int.from_bytes(hashlib.blake2b("\x1e".join(exact_parts).encode(), digest_size=8).digest(), "big"),
            int.from_bytes(hashlib.blake2b("\x1e".join(near_parts).encode(), digest_size=8).digest(), "big"))


# -- the conversion --------------------------------------------------------------------------------------------

BATCH = 512  # conversations measured per tokenizer call
ROW_UNITS = {"jsonl": "lines", "json": "records", "csv": "rows", "txt": "lines"}  # what rows_read counts, by container
MAX_REPORTED_DROPS = 10_000  # report.json lists this many; counts per category are always complete
REPLY_SAMPLE = 1000  # replies sampled to look for one canned reply dominating
# rough training throughput of the default model (SmolLM2-135M, LoRA), for the time estimate only:
# `python -m tuner bench` measured 315 tokens/s (QLoRA) on 2 Xeon cores (bench/README.md); more cores scale it
# less than linearly, so this errs on the slow side
CPU_TOKENS_PER_S = 170 * (os.cpu_count() or 2)
GPU_TOKENS_PER_S = 25_000


@dataclass
class _Pending:
    messages: list[dict[str, Any]]
    file: dict[str, Any]
    line: int


@dataclass
class _Run:
    """Everything one conversion accumulates; only small numbers per example are kept in memory."""

    cfg: ConvertConfig
    tokenizer: Any
    out_dir: Path
    hints: str = "cli"
    counts: _Counts = field(default_factory=_Counts)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    dropped_by_category: Counter = field(default_factory=Counter)
    unmapped: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    conversations_read: int = 0
    tokens: list[int] = field(default_factory=list)
    assistant_tokens: list[int] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    over_limit: int = 0
    truncated: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    seen_exact: set = field(default_factory=set)
    seen_near: set = field(default_factory=set)
    reply_sample: list[str] = field(default_factory=list)
    replies_seen: int = 0
    # per written example, in compact arrays (200k examples take a few MB): side, bucket, near key
    is_val: bytearray = field(default_factory=bytearray)
    buckets: array = field(default_factory=lambda: array("d"))
    near_keys: array = field(default_factory=lambda: array("Q"))
    split_counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        self.key_memo: dict[str, tuple[str, str]] = {}
        self.pii_memo: dict[str, tuple[str, tuple[str, ...]]] = {}  # text -> (text as written out, PII kinds)
        self.counter = TokenCounter(self.tokenizer)  # counter and renderer: used by the measuring thread only
        self.renderer = Renderer(self.tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuner-measure")
        self.measuring: Future | None = None
        # closed by finish() or close(); convert() guarantees one of them runs
        self.handles = {split: open(self.out_dir / f".{split}.jsonl.tmp", "w", encoding="utf-8")  # noqa: SIM115
                        for split in ("train", "validation")}

    def drop(self, item: Dropped, file_entry: dict[str, Any] | None, conversation: bool = True) -> None:
        """Count a drop: a conversation that was read (`conversation`), or a line/row that never became one."""
        self.dropped_by_category[item.category] += 1
        if len(self.dropped) < MAX_REPORTED_DROPS:
            self.dropped.append(item.to_dict())
        if file_entry is not None:
            file_entry["dropped"] += 1
            file_entry["conversations_dropped" if conversation else "rows_dropped"] += 1

    # -- per batch: measure, truncate, deduplicate, split, write --

    def flush(self, batch: list[_Pending]) -> None:
        """Queue `batch` for measuring and place the batch measured before it (the tokenizer, which
        releases the GIL, counts one batch while this thread reads and cleans the next)."""
        if self.measuring is not None:
            self._place_batch(*self.measuring.result())
            self.measuring = None
        if batch:
            self.measuring = self.pool.submit(self._measure, batch)

    def _measure(self, batch: list[_Pending]) -> tuple[list[_Pending], list[int], list[int]]:
        texts = self.renderer.render([p.messages for p in batch])
        replies = [m["content"] for p in batch for m in p.messages if m["role"] == "assistant"]
        lengths = self.counter.count(texts + replies)
        return batch, lengths[: len(batch)], lengths[len(batch):]

    def _place_batch(self, batch: list[_Pending], totals: list[int], reply_list: list[int]) -> None:
        max_len = self.cfg.max_length
        reply_lengths = iter(reply_list)
        for pending, total in zip(batch, totals, strict=True):
            messages = pending.messages
            per_reply = [next(reply_lengths) for m in messages if m["role"] == "assistant"]
            if total > max_len:
                self.over_limit += 1
                fitted = self._fit(messages) if self.cfg.overlong == "truncate" else None
                if fitted is None:
                    hint = HINTS[self.hints]
                    why = ("even the first exchange is longer" if self.cfg.overlong == "truncate"
                           else hint["overlong_drop"])
                    self.drop(Dropped(pending.file["file"], pending.line, TOO_LONG,
                                      f"{total} tokens, over max_length {max_len}; {why}. "
                                      f"{hint['raise_max_length']}"), pending.file)
                    continue
                messages, total = fitted
                per_reply = per_reply[: sum(1 for m in messages if m["role"] == "assistant")]
                self.truncated += 1
            self._place(messages, total, per_reply, pending.file)

    def _fit(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int] | None:
        """The longest prefix ending with an assistant turn that fits max_length, and its length."""
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"][:-1]
        for end in reversed(ends):
            candidate = messages[:end]
            length = token_lengths(self.tokenizer, _render(self.tokenizer, [candidate]))[0]
            if length <= self.cfg.max_length:
                return candidate, length
        return None

    def _place(self, messages: list[dict[str, Any]], total: int, per_reply: list[int],
               file_entry: dict[str, Any]) -> None:
        exact, near = _keys(messages, self.key_memo)
        if exact in self.seen_exact:
            self.exact_duplicates += 1
        elif near in self.seen_near:
            self.near_duplicates += 1
        self.seen_exact.add(exact)
        self.seen_near.add(near)
        digest = hashlib.blake2b(near.to_bytes(8, "big"), digest_size=8, key=str(self.cfg.seed).encode()[:64]).digest()
        bucket = int.from_bytes(digest, "big") / 2**64
        split = "validation" if bucket < self.cfg.val_fraction else "train"
        self.is_val.append(split == "validation")
        self.buckets.append(bucket)
        self.near_keys.append(near)
        self.split_counts[split] += 1
        self.handles[split].write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        file_entry["conversations_kept"] += 1
        self.tokens.append(total)
        self.assistant_tokens.append(sum(per_reply))
        self.reply_tokens.extend(per_reply)
        self.turns.append(sum(1 for m in messages if m["role"] != "system"))
        for m in messages:  # reservoir sample of replies, for the canned-reply check
            if m["role"] == "assistant":
                self.replies_seen += 1
                if len(self.reply_sample) < REPLY_SAMPLE:
                    self.reply_sample.append(m["content"])
                else:
                    j = self.rng.randrange(self.replies_seen)
                    if j < REPLY_SAMPLE:
                        self.reply_sample[j] = m["content"]

    # -- the end: make both splits non-empty where possible, move files into place --

    def finish(self) -> tuple[int, int]:
        self.flush([])
        self.pool.shutdown()
        for handle in self.handles.values():
            handle.close()
        move: tuple[str, str, int] | None = None
        n = len(self.buckets)
        if self.cfg.val_fraction > 0 and n >= 2 and len(set(self.near_keys)) >= 2:
            if not self.split_counts["validation"]:
                closest = min(range(n), key=self.buckets.__getitem__)  # the group nearest the validation side
                move = ("train", "validation", self.near_keys[closest])
            elif not self.split_counts["train"]:
                closest = max(range(n), key=self.buckets.__getitem__)
                move = ("validation", "train", self.near_keys[closest])
        if move is not None:
            self._move_group(*move)
        for split in ("train", "validation"):
            os.replace(self.out_dir / f".{split}.jsonl.tmp", self.out_dir / f"{split}.jsonl")
        return self.split_counts["train"], self.split_counts["validation"]

    def _move_group(self, source: str, target: str, near: int) -> None:
        # position of each example within its split file, for the examples of the group
        want_val = source == "validation"
        indices, position = set(), 0
        for flag, key in zip(self.is_val, self.near_keys, strict=True):
            if bool(flag) == want_val:
                if key == near:
                    indices.add(position)
                position += 1
        src_path = self.out_dir / f".{source}.jsonl.tmp"
        kept_path = self.out_dir / f".{source}.jsonl.tmp2"
        with open(src_path, encoding="utf-8") as fh, open(kept_path, "w", encoding="utf-8") as kept, \
                open(self.out_dir / f".{target}.jsonl.tmp", "a", encoding="utf-8") as moved:
            for i, line in enumerate(fh):
                (moved if i in indices else kept).write(line)
        os.replace(kept_path, src_path)
        self.split_counts[source] -= len(indices)
        self.split_counts[target] += len(indices)
        self.warnings.append(f"The seeded split put no example in {source if source == 'validation' else target}; "
                             f"{plural(len(indices), 'example')} {agree(len(indices), 'was')} moved there so both "
                             "splits have data.")

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        for handle in self.handles.values():
            handle.close()
        for split in ("train", "validation"):
            for suffix in (".tmp", ".tmp2"):
                (self.out_dir / f".{split}.jsonl{suffix}").unlink(missing_ok=True)


def _display_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _check_config(cfg: ConvertConfig) -> None:
    if cfg.max_length > limits.MAX_EXAMPLE_TOKENS:
        raise TunerError(f"max_length {cfg.max_length} is over the server limit of {limits.MAX_EXAMPLE_TOKENS} tokens.")
    unknown = sorted(set(cfg.column_map) - set(COLUMN_GUESSES))
    if unknown:
        raise TunerError(f"Unknown column {agree(len(unknown), 'role')} {and_list(unknown)}; "
                         f"use {', '.join(COLUMN_GUESSES)}.")
    both = {_label(n) for n in cfg.assistant_names} & {_label(n) for n in cfg.user_names}
    if both:
        raise TunerError(f"{', '.join(sorted(both))} is named as both assistant and user; pick one side.")


def convert(paths: list[str | Path] | str | Path, out_dir: str | Path, cfg: ConvertConfig | None = None,
            tokenizer: Any = None, progress: Callable[[float, str], Any] | None = None,
            hints: str = "cli") -> dict[str, Any]:
    """Convert exports into `out_dir/train.jsonl`, `validation.jsonl` and `report.json`; returns the report.

    Problems with single rows or files are reported, not raised; TunerError only for bad settings or
    limits (too many files). `progress(fraction, text)` is called as files are read (gr.Progress fits).
    `hints` words the advice in reasons and warnings: "cli" names flags, "page" names settings in words.

    Long on purpose: reading, cleaning, redaction, counting, splitting and writing stream through one pass here, and splitting it would hand a dozen running totals between functions.
    """
    if hints not in HINTS:
        raise TunerError(f"hints must be one of {', '.join(HINTS)}, got '{hints}'.")
    started = time.monotonic()
    cfg = cfg or ConvertConfig()
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise DataError("no input files given.")
    if len(paths) > limits.MAX_FILES:
        raise DataError(f"{len(paths)} files given; at most {limits.MAX_FILES} can be converted at once. "
                        "Combine or split the upload.")
    _check_config(cfg)
    if tokenizer is None:
        from tuner.models import load_tokenizer

        tokenizer = load_tokenizer("default")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, tokenizer, out_dir, hints)
    files: list[dict[str, Any]] = []
    sizes = [p.stat().st_size if p.is_file() else 0 for p in paths]
    total_bytes, done_bytes = max(1, sum(sizes)), 0

    def report_progress(src: Source) -> None:
        if progress is not None:
            fraction = min(1.0, (done_bytes + src.bytes_read) / total_bytes)
            progress(fraction, f"{src.name}: {run.conversations_read} conversations read")

    try:
        batch: list[_Pending] = []
        for path, name, size in zip(paths, _display_names(paths), sizes, strict=True):
            # one unit per count: rows_* count the file's lines/records/rows (row_unit), conversations_* count
            # conversations (read = kept + conversations_dropped); "dropped" is both, as listed in report["dropped"]
            entry: dict[str, Any] = {"file": name, "format": None, "encoding": None, "rows_read": 0, "row_unit": None,
                                     "rows_dropped": 0, "conversations_read": 0, "conversations_kept": 0,
                                     "conversations_dropped": 0, "dropped": 0, "error": None}
            files.append(entry)
            src = Source(path, name, dict(cfg.column_map))
            try:
                if not path.is_file():
                    raise DataError("no such file.", name)
                entry["format"] = resolve_format(cfg.format, path, cfg.column_map, name)
                entry["row_unit"] = ROW_UNITS[entry["format"].rsplit("-", 1)[1]]
                for item in parse(src, entry["format"]):
                    if isinstance(item, Dropped):
                        run.drop(item, entry, conversation=False)
                        continue
                    if run.conversations_read >= limits.MAX_CONVERSATIONS:
                        run.drop(Dropped(name, item.line, OVER_LIMIT,
                                         f"the limit of {limits.MAX_CONVERSATIONS} conversations per dataset was "
                                         "reached; this and later conversations were not read"), entry,
                                 conversation=False)
                        break
                    run.conversations_read += 1
                    entry["conversations_read"] += 1
                    cleaned = clean(item, cfg, run.counts, run.unmapped, run.hints)
                    if isinstance(cleaned, Dropped):
                        run.drop(cleaned, entry)
                        continue
                    _pii(run, cleaned)
                    batch.append(_Pending(cleaned, entry, item.line))
                    if len(batch) >= BATCH:
                        run.flush(batch)
                        batch = []
                        report_progress(src)
            except DataError as exc:  # the whole file is unusable; the other files still convert
                entry["error"] = str(exc)
                run.drop(Dropped(name, exc.line or 1, UNREADABLE_FILE, str(exc)), entry, conversation=False)
            entry["rows_read"], entry["encoding"] = src.rows_read, src.encoding or None
            done_bytes += size
            src.bytes_read = 0
            report_progress(src)
            for note in src.notes:
                run.warnings.append(f"{name}: {note}")
        run.flush(batch)
        train_n, val_n = run.finish()
    except BaseException:
        run.close()
        raise
    report = _report(run, files, train_n, val_n, started)
    canaries_file = out_dir / "canaries.json"
    canaries_file.unlink(missing_ok=True)  # an earlier conversion's canaries would describe other data
    report["canaries"] = cfg.canaries if report["ok"] else 0
    if report["canaries"]:  # into this copy only: the user's files are never written
        from tuner.memorisation import plant_in_file

        plant_in_file(out_dir / "train.jsonl", canaries_file, cfg.canaries, cfg.seed, cfg.system_prompt)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def _pii(run: _Run, messages: list[dict[str, Any]]) -> None:
    from tuner import pii

    region, memo = run.cfg.pii_region, run.pii_memo
    for m in messages:
        if m["role"] == "system":
            continue  # the brand brief is the user's own text
        content = m["content"]
        seen = memo.get(content)
        if seen is None:
            if not pii.might_hold_pii(content):
                continue
            if run.cfg.redact_pii:
                redacted, found = pii.redact(content, region)
            else:
                redacted, found = content, pii.count(content, region)
            seen = _remember(memo, content, (redacted, tuple(found.elements())))
        m["content"] = seen[0]
        run.pii.update(seen[1])


def _reply_template_share(replies: list[str]) -> tuple[float, str]:
    """Share of sampled replies that are near-copies (>= 92% similar) of one reply, and that reply."""
    if len(replies) < 20:
        return 0.0, ""
    from rapidfuzz import fuzz, process

    norm = [" ".join(r.casefold().split()) for r in replies]
    scores = process.cdist(norm, norm, scorer=fuzz.ratio, score_cutoff=92, dtype="uint8", workers=1)
    neighbours = (scores > 0).sum(axis=1)
    best = int(neighbours.argmax())
    return float(neighbours[best]) / len(replies), replies[best]


def dropped_by_unit(files: list[dict[str, Any]]) -> dict[str, int]:
    """What was dropped, counted in the thing it was: {"lines": 8, "conversations": 2} (sums to the drops listed).

    A line, row or record that never became a conversation counts in its file's row unit; a whole
    file that could not be read counts as one file.
    """
    units: Counter = Counter()
    for entry in files:
        unreadable = 1 if entry["error"] else 0
        units["files"] += unreadable
        units[entry["row_unit"] or "lines"] += entry["rows_dropped"] - unreadable
        units["conversations"] += entry["conversations_dropped"]
    return {unit: n for unit, n in units.items() if n}


def _model_name(tokenizer: Any) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    return Path(name).name if name and Path(name).is_dir() else name  # a folder's name, or the Hub id


def _report(run: _Run, files: list[dict[str, Any]], train_n: int, val_n: int, started: float) -> dict[str, Any]:
    """The report.json mapping: every count the page and the CLI show, assembled in one place (long, but one dict)."""
    cfg = run.cfg
    order = {entry["file"]: i for i, entry in enumerate(files)}
    run.dropped.sort(key=lambda d: (order.get(d["file"], 0), d["line"]))  # length drops come in batches: re-order
    examples = train_n + val_n
    warnings = list(run.warnings)
    for entry in files:
        if entry["error"]:
            warnings.append(f"{entry['file']} was skipped: {entry['error']}")
    hint = HINTS[run.hints]
    if run.unmapped:
        labels = ", ".join(f"'{k}' ({v})" for k, v in run.unmapped.most_common(10))
        n = run.dropped_by_category[UNMAPPED_SPEAKER]
        warnings.append(f"{plural(n, 'conversation')} dropped because {agree(len(run.unmapped), 'this')} "
                        f"{agree(len(run.unmapped), 'speaker')} {agree(len(run.unmapped), 'has')} no role: {labels}. "
                        f"{hint['map_speakers']}")
    dup = run.exact_duplicates + run.near_duplicates
    if examples and dup / examples >= 0.2:
        warnings.append(f"{dup} of {examples} examples ({dup / examples:.0%}) are duplicates or near-duplicates; "
                        "the model will over-learn them. Remove repeated conversations.")
    share, template = _reply_template_share(run.reply_sample)
    if share >= 0.25:
        warnings.append(f"{share:.0%} of replies are near-copies of one reply (\"{template[:80]}\"): canned macros "
                        "teach the model to repeat them. Thin them out.")
    replies = _summary(run.reply_tokens)
    if len(run.reply_tokens) >= 20 and replies["median"] and replies["p95"] > 8 * replies["median"]:
        warnings.append(f"Reply lengths are very uneven (median {replies['median']} tokens, 95th percentile "
                        f"{replies['p95']}): a few long replies dominate training. {hint['lower_max_length']}")
    if run.truncated:
        warnings.append(f"{plural(run.truncated, 'example')} {agree(run.truncated, 'was')} over {cfg.max_length} "
                        f"tokens and lost {agree(run.truncated, 'its')} last turns.")
    if run.dropped_by_category[TOO_LONG]:
        n = run.dropped_by_category[TOO_LONG]
        warnings.append(f"{plural(n, 'example')} over {cfg.max_length} tokens {agree(n, 'was')} dropped.")
    if sum(run.pii.values()) and not cfg.redact_pii:
        found = ", ".join(f"{n} {k}" for k, n in run.pii.most_common())
        warnings.append(f"Personal data found ({found}) and kept; {hint['redact']}.")
    dropped_total = sum(run.dropped_by_category.values())
    if dropped_total > len(run.dropped):
        warnings.append(f"{dropped_total:,} lines, rows and conversations were dropped; the report lists the first "
                        f"{len(run.dropped):,} (counts per category are complete).")
    ok = examples >= cfg.min_examples and train_n > 0
    reason = None
    if not ok:
        have = "no usable examples yet" if not examples else f"only {plural(examples, 'usable example')}"
        reason = f"{have}; at least {cfg.min_examples} are needed to train"
        if run.dropped_by_category:
            category, n = run.dropped_by_category.most_common(1)[0]
            first = next((d for d in run.dropped if d["category"] == category), None)
            reason += f" ({n:,} dropped as '{category}'"
            reason += f", e.g. {first['file']} line {first['line']}: {first['reason']})" if first else ")"
        warnings.insert(0, f"Training is blocked: {reason}.")
    train_tokens = sum(run.tokens)  # all examples; the split share is what one epoch sees
    epoch_tokens = round(train_tokens * train_n / examples) if examples else 0
    stats = {
        "conversations_read": run.conversations_read,
        "examples": examples,
        "turns": _summary(run.turns),
        "tokens": _summary(run.tokens),
        "assistant_tokens": _summary(run.assistant_tokens),
        "reply_tokens": _summary(run.reply_tokens),
        "max_length": cfg.max_length,
        "overlong": cfg.overlong,
        "over_limit": run.over_limit,
        "truncated": run.truncated,
        "exact_duplicates": run.exact_duplicates,
        "near_duplicates": run.near_duplicates,
        "merged_messages": run.counts.merged_messages,
        "trimmed_greetings": run.counts.trimmed_greetings,
        "trimmed_unanswered": run.counts.trimmed_unanswered,
        "system_prompt_added": run.counts.system_prompt_added,
        "dropped_by_category": dict(run.dropped_by_category),
        "tokenizer": _model_name(run.tokenizer),
        "train_time_estimate": {
            "tokens_per_epoch": epoch_tokens,
            # seconds, shown with tuner.progress.fmt_duration (minutes rounded to 0.1 read "0.0 min")
            "cpu_s_per_epoch": round(epoch_tokens / CPU_TOKENS_PER_S, 1),
            "gpu_s_per_epoch": round(epoch_tokens / GPU_TOKENS_PER_S, 1),
            "assumes": f"the default 135M model with LoRA at about {CPU_TOKENS_PER_S} tokens/s on this machine's CPU "
                       f"and {GPU_TOKENS_PER_S} tokens/s on a GPU; larger models are slower",
        },
    }
    totals = {key: sum(entry[key] for entry in files)
              for key in ("conversations_read", "conversations_kept", "conversations_dropped", "rows_dropped", "dropped")}
    totals["dropped_by_unit"] = dropped_by_unit(files)
    return {
        "ok": ok,
        "reason": reason,
        "files": files,
        # the headline's numbers: sums of the files table's columns, so the two always agree
        "totals": totals,
        "dropped": run.dropped,
        "dropped_total": dropped_total,
        "stats": stats,
        "warnings": warnings,
        "pii": {kind: run.pii.get(kind, 0) for kind in ("email", "phone", "card", "iban", "ip")},
        "pii_redacted": cfg.redact_pii,
        "unmapped_speakers": [label for label, _ in run.unmapped.most_common()],
        # the names given (assistant_names, user_names) that speakers in these files matched
        "named_speakers": sorted(run.counts.named),
        # label -> conversations dropped for it; the caller words the fix (CLI flags, or the page's checklist)
        "unmapped_speaker_conversations": dict(run.unmapped.most_common()),
        "train_examples": train_n,
        "validation_examples": val_n,
        "elapsed_s": round(time.monotonic() - started, 2),
        "config": {k: v for k, v in vars(cfg).items()},
    }


# -- detection for the page ----------------------------------------------------------------------------------

DETECT_SAMPLE = 500  # conversations looked at
DETECT_LINES = 20_000  # lines read at most, so a large export is described in a moment


def detect(path: str | Path, cfg: ConvertConfig | None = None) -> dict[str, Any]:
    """What a file looks like before converting: format, encoding, columns (and guesses), speakers seen.

    Raises DataError when the file cannot be read or recognised, with the fix in the message.
    """
    cfg = cfg or ConvertConfig()
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file.", path.name)
    fmt = resolve_format(cfg.format, path, cfg.column_map, path.name)
    src = Source(path, path.name, dict(cfg.column_map), max_lines=DETECT_LINES)
    speakers: Counter = Counter()
    conversations = dropped = 0
    strict = False
    items = parse(src, fmt)
    for item in items:
        if isinstance(item, Dropped):
            dropped += 1
            continue
        conversations += 1
        strict = item.strict_roles
        speakers.update(m["role"] for m in item.messages)
        if conversations >= DETECT_SAMPLE:
            break
    items.close()  # type: ignore[attr-defined]
    roles = {label: role_of(label, strict, cfg.assistant_names, cfg.user_names) for label in speakers}
    return {
        "file": path.name,
        "format": fmt,
        "description": FORMAT_HELP[fmt],
        "encoding": src.encoding,
        "columns": src.columns,
        "column_map": guess_columns(src.columns, cfg.column_map) if src.columns else {},
        "speakers": [label for label, _ in speakers.most_common()],
        "speaker_roles": roles,
        "unmapped": [label for label, role in roles.items() if role is None],
        "sampled_conversations": conversations,
        "sampled_dropped": dropped,
    }


# -- command line ---------------------------------------------------------------------------------------------


def _help(name: str) -> str:
    return ConvertConfig.__dataclass_fields__[name].metadata["help"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    d = ConvertConfig()
    parser.add_argument("files", nargs="+", metavar="FILE", help="Exports to convert (formats may differ).")
    parser.add_argument("--out", required=True, metavar="DIR", help="Folder for train.jsonl, validation.jsonl, report.json.")
    parser.add_argument("--system-prompt", default=d.system_prompt, metavar="TEXT", help=_help("system_prompt"))
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help=_help("val_fraction"))
    parser.add_argument("--seed", type=int, default=d.seed, help=_help("seed"))
    parser.add_argument("--redact-pii", action="store_true", help=_help("redact_pii"))
    parser.add_argument("--pii-region", default=d.pii_region, help=_help("pii_region"))
    parser.add_argument("--max-length", type=int, default=d.max_length, help=_help("max_length"))
    parser.add_argument("--overlong", choices=("truncate", "drop"), default=d.overlong, help=_help("overlong"))
    parser.add_argument("--assistant", action="append", default=[], metavar="NAME",
                        help="A speaker label to treat as the assistant (repeatable).")
    parser.add_argument("--user", action="append", default=[], metavar="NAME",
                        help="A speaker label to treat as the user (repeatable).")
    parser.add_argument("--format", default=d.format, metavar="F",
                        help=f"Input format: auto, a shape ({', '.join(('openai', 'sharegpt', 'alpaca', 'pairs', 'messages', 'transcript'))}) "
                             f"or one of {', '.join(PARSERS)}.")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=NAME",
                        help=f"Column for a field of tabular exports ({', '.join(COLUMN_GUESSES)}), e.g. text=body.")
    parser.add_argument("--min-examples", type=int, default=d.min_examples, help=_help("min_examples"))
    parser.add_argument("--canaries", type=int, default=d.canaries, metavar="N", help=_help("canaries"))
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def cli(args: argparse.Namespace) -> int:
    column_map = {}
    for item in args.column:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TunerError(f"--column takes FIELD=NAME (e.g. text=body), got '{item}'.")
        column_map[key.strip()] = value.strip()
    cfg = ConvertConfig(system_prompt=args.system_prompt, val_fraction=args.val_fraction, seed=args.seed,
                        redact_pii=args.redact_pii, pii_region=args.pii_region, max_length=args.max_length,
                        overlong=args.overlong, assistant_names=args.assistant, user_names=args.user,
                        format=args.format, column_map=column_map, min_examples=args.min_examples,
                        canaries=args.canaries)
    report = convert(args.files, args.out, cfg, progress=_terminal_progress())
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report, args.out))
    if not report["ok"]:
        print(f"error: {report['reason']}", file=sys.stderr)
        return 1
    return 0


def _terminal_progress() -> Callable[[float, str], None] | None:
    """A tqdm bar on stderr for interactive terminals; nothing when output is piped."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", file=sys.stderr, leave=False, bar_format="{l_bar}{bar}| {elapsed}")

    def update(fraction: float, text: str) -> None:
        bar.set_description(text, refresh=False)
        bar.update(round(fraction * 100) - bar.n)
        if fraction >= 1.0:
            bar.close()

    return update


_PII_KINDS = ", ".join(many for _, many in list(PII_WORDS.values())[:-1]) + " or " + PII_WORDS["ip"][1]
PII_SCOPE = ("It looks for e-mail addresses, phone numbers, card numbers, IBANs and IP addresses only, "
             "not names or postal addresses.")


def _pii_list(counts: dict[str, int]) -> str:
    words = [f"{n} {PII_WORDS.get(k, (k, k))[n != 1]}" for k, n in counts.items()]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def pii_statement(report: dict[str, Any] | None) -> str:
    """What was done about personal data, in words read from a data folder's report.json only: the
    counts (`pii`: occurrences in the messages the converter read, a repeated address each time) and
    whether they were replaced (`pii_redacted`). The cards, READMEs and the page all say this.

    >>> pii_statement({"pii": {"email": 1, "ip": 0}, "pii_redacted": False}).split(". ")[0]
    'Personal data NOT redacted: the converter found 1 e-mail address in the conversations and left it as written'
    """
    if not report or not isinstance(report.get("pii"), dict):
        return ("Personal data not checked: this data did not come through tuner's converter, which looks for "
                f"{_PII_KINDS}.")
    found = {k: int(v) for k, v in report["pii"].items() if isinstance(v, int) and v > 0}
    total = sum(found.values())
    redacted = report.get("pii_redacted")
    if redacted is True and total:
        said = (f"Personal data redacted: the converter replaced {_pii_list(found)} with placeholders such as "
                "[EMAIL] before training.")
    elif redacted is True:
        said = "Personal data: redaction was on, and the converter found nothing to replace."
    elif not total:
        said = "Personal data not redacted (redaction was off); the converter found none in the conversations."
    elif redacted is False:
        said = (f"Personal data NOT redacted: the converter found {_pii_list(found)} in the conversations and left "
                f"{'it' if total == 1 else 'them'} as written.")
    else:  # a report from before `pii_redacted` was recorded
        said = (f"Personal data: the converter found {_pii_list(found)} in the conversations; its report does not "
                "say whether they were redacted.")
    return f"{said} {PII_SCOPE}"


def format_report(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The report as a short plain-text summary (the CLI's default output)."""
    s = report["stats"]
    lines = [f"{'Ready to train' if report['ok'] else 'NOT trainable'}: {report['train_examples']} train + "
             f"{report['validation_examples']} validation examples from {report['totals']['conversations_read']} "
             f"conversations read in {report['elapsed_s']} s"
             + (f" -> {out_dir}" if out_dir else "")]
    for f in report["files"]:
        state = f"error: {f['error']}" if f["error"] else (
            f"{f['conversations_read']} conversations read, {f['conversations_kept']} kept, "
            f"{f['conversations_dropped']} dropped; {f['rows_read']} {f['row_unit']} read, {f['rows_dropped']} skipped")
        lines.append(f"  {f['file']} [{f['format'] or '?'}]: {state}")
    if s["examples"]:
        t, a = s["tokens"], s["assistant_tokens"]
        lines.append(f"Tokens per example: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']} "
                     f"(limit {s['max_length']}; {s['over_limit']} over, {s['truncated']} truncated)")
        lines.append(f"Assistant tokens per example: min {a['min']}, median {a['median']}, p95 {a['p95']}, "
                     f"max {a['max']}; turns: {s['turns']['total']}")
        lines.append(f"Duplicates: {s['exact_duplicates']} exact, {s['near_duplicates']} near; merged messages: "
                     f"{s['merged_messages']}; trimmed greetings: {s['trimmed_greetings']}, unanswered endings: "
                     f"{s['trimmed_unanswered']}")
        est = s["train_time_estimate"]
        lines.append(f"One epoch: ~{est['tokens_per_epoch']} tokens, roughly {fmt_duration(est['cpu_s_per_epoch'])} "
                     f"on CPU / {fmt_duration(est['gpu_s_per_epoch'])} on GPU (default model)")
    pii_found = {k: v for k, v in report["pii"].items() if v}
    if pii_found:
        lines.append("PII " + ("redacted" if report["pii_redacted"] else "found (not redacted)") + ": "
                     + ", ".join(f"{k} {v}" for k, v in pii_found.items()))
    if report["dropped_total"]:
        lines.append(f"Dropped {report['dropped_total']}: "
                     + ", ".join(f"{k} {v}" for k, v in s["dropped_by_category"].items()))
        for d in report["dropped"][:20]:
            lines.append(f"  {d['file']}:{d['line']}  {d['category']}: {d['reason']}")
        if report["dropped_total"] > 20:
            lines.append(f"  ... {report['dropped_total'] - 20} more in report.json")
    if report.get("canaries"):
        lines.append(f"Planted {plural(report['canaries'], 'canary')} (made-up conversations holding a "
                     "random code) in train.jsonl, listed in canaries.json; the evaluation checks whether the tuned "
                     "model learned them.")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
