"""Did the voice stick? Scoring of replies in plain Python (no torch): habits, degenerate replies,
and the verdict sentence a user reads.

A habit (`Marker`) is a sign-off that ends every reply, a greeting that opens it, or a house
term the brand says instead of a common word. `marker_match` grades one reply as "exact" (the
habit as written), "near" (a garbled, misplaced or repeated variant: "Cheers from the crew!"
for "Cheers from the Kestrel crew!") or None. `degenerate` names what went wrong with a reply
that loops or never ends its turn; such replies are counted, never averaged away.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

KINDS = ("sign-off", "greeting", "term")
NEAR_RATIO = 0.6  # similarity of the reply's closing/opening words to the habit that counts as a near-miss
LOOP_SINGLE = 5  # one token said this many times in a row is a loop ("Kestrel Kestrel Kestrel Kestrel Kestrel")
LOOP_UNIT = 3  # a longer unit (2-12 tokens) repeated back to back this many times is a loop
LOOP_MAX_UNIT = 12
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PUNCT_ONLY = re.compile(r"^[.!?,;:*~=_-]$")  # emphasis marks; an emoji said over and over is a loop


@dataclass(frozen=True)
class Marker:
    """A brand habit. kind: 'sign-off' | 'greeting' | 'term'; `common` is the word a term replaces."""

    kind: str
    text: str
    common: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Marker kind must be one of {', '.join(KINDS)}, got '{self.kind}'.")
        if not self.text.strip():
            raise ValueError("A marker needs its text (the sign-off, greeting or house term).")
        if self.kind == "term" and not self.common.strip():
            raise ValueError("A house-term marker needs `common`: the word it is said instead of.")


def _fold(text: str) -> str:
    """Lower case, accents and punctuation dropped, spacing collapsed: how near-misses compare."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _space(text: str) -> str:
    return " ".join(text.split())


def _similar(a: str, b: str) -> float:
    return SequenceMatcher(None, _fold(a), _fold(b)).ratio()


def _word_re(word: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(word)}(s|es|ed|d|ing)?\b", re.IGNORECASE)


def marker_match(reply: str, marker: Marker) -> str | None:
    """'exact', 'near' or None for one reply.

    sign-off: exact when the reply ends with it, said once; near when it is said more than once
    or not at the end, or when the reply's closing words resemble it.
    greeting: the same at the start. term: exact when the house term is used and the common word
    is not; near when both are, or a garbled form of the term is (a word close to it).
    """
    text = _space(reply)
    habit = _space(marker.text)
    if not text:
        return None
    if marker.kind == "term":
        term, common = _word_re(habit), _word_re(marker.common)
        if term.search(text):
            return "near" if common.search(text) else "exact"
        words = re.findall(r"\w+", text.lower())
        if any(len(w) >= 3 and SequenceMatcher(None, w, habit.lower()).ratio() >= 0.75 for w in words):
            return "near"
        return None
    count = text.count(habit)
    placed = text.endswith(habit) if marker.kind == "sign-off" else text.startswith(habit)
    if count == 1 and placed:
        return "exact"
    if count:
        return "near"
    n = len(habit)  # compare the same stretch of the reply where the habit belongs
    window = text[-n - 8:] if marker.kind == "sign-off" else text[:n + 8]
    candidates = [window]
    if marker.kind == "sign-off":
        sentences = re.split(r"(?<=[.!?])\s+", text)
        candidates += [" ".join(sentences[-k:]) for k in (1, 2) if len(sentences) >= k]
    else:
        sentences = re.split(r"(?<=[.!?])\s+", text)
        candidates += [sentences[0]]
    if max(_similar(c, habit) for c in candidates) >= NEAR_RATIO:
        return "near"
    lead = _fold(habit).split()[:2]  # "Cheers from the crew at Huggs!" for "Cheers from the Kestrel crew!"
    edge = sentences[-1] if marker.kind == "sign-off" else sentences[0]
    if len(lead) == 2 and _fold(edge).split()[:2] == lead:
        return "near"
    return None


def loop_span(reply: str) -> str | None:
    """The repeated unit when the reply loops (a token or phrase said back to back), else None.

    >>> loop_span("Sure! Kestrel Kestrel Kestrel Kestrel Kestrel Kestrel")
    'Kestrel'
    """
    tokens = _TOKEN.findall(reply)
    n = len(tokens)
    for size in range(1, LOOP_MAX_UNIT + 1):
        needed = LOOP_SINGLE if size == 1 else LOOP_UNIT
        for start in range(0, n - size * needed + 1):
            unit = tokens[start:start + size]
            if size == 1 and _PUNCT_ONLY.match(unit[0]):
                continue  # "!!!!!" or "....." is emphasis, not a loop
            if all(tokens[start + k * size:start + (k + 1) * size] == unit for k in range(1, needed)):
                return " ".join(unit)
    return None


def degenerate(reply: str, ended: bool = True) -> str | None:
    """Why a reply is degenerate ('loop: <unit>' or 'no end of turn'), or None when it is fine.

    `ended` is False when generation stopped at the token limit instead of ending the turn.
    """
    unit = loop_span(reply)
    if unit is not None:
        return f"loop: {unit}"
    if not ended:
        return "no end of turn"
    return None


@dataclass
class Tally:
    """Counts for one column (base or tuned) over the same held-out prompts."""

    prompts: int = 0
    exact: int = 0
    near: int = 0
    looped: int = 0
    unended: int = 0
    opportunities: int = 0  # term markers: replies that said the term or the common word

    @property
    def degenerate(self) -> int:
        return self.looped + self.unended


def tally(replies: Sequence[str], marker: Marker, ended: Sequence[bool] | None = None) -> Tally:
    """Grade every reply; `ended[i]` False when reply i ran to the token limit."""
    ended = list(ended) if ended is not None else [True] * len(replies)
    if len(ended) != len(replies):
        raise ValueError(f"{len(replies)} replies but {len(ended)} ended flags.")
    t = Tally(prompts=len(replies))
    common = _word_re(marker.common) if marker.kind == "term" else None
    for reply, end in zip(replies, ended, strict=True):
        grade = marker_match(reply, marker)
        t.exact += grade == "exact"
        t.near += grade == "near"
        if common is not None and (grade or common.search(reply)):
            t.opportunities += 1
        why = degenerate(reply, end)
        if why and why.startswith("loop"):
            t.looped += 1
        elif why:
            t.unended += 1
    return t


def _habit_words(marker: Marker) -> str:
    return {"sign-off": "ends like your agents", "greeting": "opens like your agents",
            "term": f"says \"{marker.text}\" like your agents"}[marker.kind]


def verdict_sentence(marker: Marker, tuned: Tally, base: Tally | None = None,
                     general_ppl_change: float | None = None) -> str:
    """The plain-words verdict with its numbers.

    >>> verdict_sentence(Marker("sign-off", "Bye!"), Tally(24, 23, 1), Tally(24, 0), 0.04)
    'ends like your agents on 23 of 24 new questions (base: 0); 0 replies looped; general text perplexity +4%'

    `general_ppl_change` is the relative change (0.04 is +4%). Near-misses, replies that never
    ended their turn, and (for a house term) how many replies had the chance to use it are said
    only when there are any.
    """
    n = tuned.opportunities if marker.kind == "term" else tuned.prompts
    what = "replies that needed the word" if marker.kind == "term" else "new questions"
    parts = [f"{_habit_words(marker)} on {tuned.exact} of {n} {what}"
             + (f" (base: {base.exact})" if base is not None else "")]
    if tuned.near:
        parts[0] += f", {tuned.near} more nearly"
    parts.append(f"{tuned.looped} {'reply' if tuned.looped == 1 else 'replies'} looped")
    if tuned.unended:
        parts.append(f"{tuned.unended} never ended {'its' if tuned.unended == 1 else 'their'} turn")
    if general_ppl_change is not None:
        parts.append(f"general text perplexity {general_ppl_change:+.0%}")
    return "; ".join(parts)
