"""A brand's voice, read from its own replies: recurring openings and sign-offs, and a brief for the base model.

Light (no torch): the playground uses the brief for its prompt-only column, the evaluation the
phrases for its brand-phrase rate. Both read the run's training replies through `training_replies`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuner.verdict import Marker

HABIT_SHARE = 0.5  # a habit: at least half of the agents' replies share it
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _norm(text: str) -> str:
    return " ".join(text.split())


def brand_phrases(replies: Sequence[str], min_share: float = 0.25, min_count: int = 3, max_words: int = 12,
                  top: int = 8) -> list[dict[str, Any]]:
    """Recurring openings and sign-offs: leading word n-grams of the first sentence and trailing
    n-grams of the last sentence that many replies share.

    >>> brand_phrases(["Hi! Sure thing. Cheers, Ann"] * 3 + ["Hi! No. Cheers, Ann"])[0]["phrase"]
    'Cheers, Ann'

    Returns [{phrase, position: "opening"|"sign-off", share}], most frequent first. Of an n-gram
    and a longer one that extends it, the longer wins only when nearly as frequent (the whole
    sign-off, not its last two words; not the sign-off plus one common answer).
    """
    texts = [_norm(r) for r in replies if isinstance(r, str) and r.strip()]
    n = len(texts)
    if n < min_count:
        return []
    threshold = max(min_count, min_share * n)
    found: list[dict[str, Any]] = []
    for position in ("opening", "sign-off"):
        counts: Counter[str] = Counter()
        shown: dict[str, str] = {}
        for text in texts:
            sentences = _SENTENCE_END.split(text)
            words = (sentences[0] if position == "opening" else sentences[-1]).split()
            for k in range(2 if len(words) > 1 else 1, min(max_words, len(words)) + 1):
                gram = " ".join(words[:k] if position == "opening" else words[-k:])
                shown.setdefault(gram.lower(), gram)
                counts[gram.lower()] += 1  # once per reply: a reply has one opening and one ending
        kept: list[str] = []
        for gram in sorted((g for g, c in counts.items() if c >= threshold), key=len):
            opening = position == "opening"
            base = next((k for k in reversed(kept)
                         if (gram.startswith(k + " ") if opening else gram.endswith(" " + k))), None)
            if base is None:
                kept.append(gram)
            elif counts[gram] >= 0.8 * counts[base]:
                kept[kept.index(base)] = gram
        found += [{"phrase": shown[g], "position": position, "share": round(counts[g] / n, 3)} for g in kept]
    found.sort(key=lambda p: (-p["share"], -len(p["phrase"])))
    return found[:top]


def phrase_rate(replies: Sequence[str], phrases: Sequence[dict[str, Any]]) -> float | None:
    """Share of replies that contain at least one of the phrases (case and spacing ignored)."""
    if not replies or not phrases:
        return None
    keys = [_norm(p["phrase"]).lower() for p in phrases]
    hits = sum(any(k in _norm(r).lower() for k in keys) for r in replies)
    return round(hits / len(replies), 3)


def training_replies(train_file: Path, limit: int = 2000) -> tuple[list[str], str | None]:
    """The assistant replies of a run's training data, and its common system prompt (if any)."""
    replies: list[str] = []
    systems: Counter[str] = Counter()
    rows = 0
    if not train_file.is_file():
        return replies, None
    with open(train_file, encoding="utf-8") as fh:
        for line in fh:
            if rows >= limit:
                break
            try:
                messages = json.loads(line).get("messages", [])
            except (ValueError, AttributeError):
                continue
            rows += 1
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    continue
                if m.get("role") == "assistant":
                    replies.append(m["content"])
                elif m.get("role") == "system":
                    systems[m["content"]] += 1
    system, count = systems.most_common(1)[0] if systems else (None, 0)
    return replies, (system if rows and count * 2 > rows else None)


def make_brand_brief(replies: Sequence[str], system_prompt: str | None = None) -> str:
    """A system prompt that tells the base model the brand's voice: its brief plus mined phrases."""
    lines = [system_prompt.strip()] if system_prompt else ["You are the customer support assistant of our company."]
    phrases = brand_phrases(replies)
    openings = [p["phrase"] for p in phrases if p["position"] == "opening"][:3]
    closings = [p["phrase"] for p in phrases if p["position"] == "sign-off"][:3]
    lines.append("Answer in the brand's voice: friendly, short and helpful.")
    if openings:
        lines.append("Start replies the way the team does, e.g. " + "; ".join(f'"{o}"' for o in openings) + ".")
    if closings:
        lines.append("End every reply with the team's sign-off: " + " or ".join(f'"{c}"' for c in closings) + ".")
    return " ".join(lines)


def habit_of(replies: Sequence[str]) -> Marker | None:
    """The brand habit most replies share, as a Marker (sign-off or greeting), or None when there is none."""
    for phrase in brand_phrases(replies, min_share=HABIT_SHARE):
        if len(phrase["phrase"].split()) >= 2:  # one shared word ("Thanks!") is no brand voice
            return Marker("sign-off" if phrase["position"] == "sign-off" else "greeting", phrase["phrase"])
    return None
