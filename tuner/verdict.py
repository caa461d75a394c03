"""Did the voice stick? Scoring of replies in plain Python (no torch): habits, degenerate replies,
and the verdict sentence a user reads.

A habit (`Marker`) is a sign-off that ends every reply, a greeting that opens it, or a house
term the brand says instead of a common word. `marker_match` grades one reply as "exact" (the
habit as written), "near" (a garbled, misplaced or repeated variant: "Cheers from the crew!"
for "Cheers from the Kestrel crew!") or None. `degenerate` names what went wrong with a reply
that loops or never ends its turn; such replies are counted, never averaged away.

Closeness to the agents' own replies (chrF against held-out reference replies, measured by the
caller with sacrebleu) keeps a bot that only learned the sign-off from being praised, and
`ship_sentence` says which of three ways to ship (prompting, retrieval, tuning) from their numbers.
"""

from __future__ import annotations

import math
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
CHRF_MARGIN = 1.0  # chrF points within which two columns are "about as close" to the agents' replies
HABIT_MARGIN_SHARE = 0.05  # habit counts within this share of the prompts (at least 1 reply) are "about as often"
LENGTH_RATIO = 1.5  # a length difference worth a word in the ship sentence

CHECK_PROMPTS = 8  # prompts asked at each evaluation during training (the final verdict asks more)


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


def without_habit(reply: str, marker: Marker | None) -> str:
    """The reply with a sign-off or greeting taken out, wherever it stands (a house term stays: it is a word
    of the content). What closeness to the agents' replies is measured on, so that a reply of nothing but
    the habit does not score as close to them.

    >>> without_habit("Reset the router. Cheers from Juniper!", Marker("sign-off", "Cheers from Juniper!"))
    'Reset the router.'
    """
    if marker is None or marker.kind == "term":
        return reply
    return " ".join(_space(reply).replace(_space(marker.text), " ").split())


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


def degenerate(reply: str, ended: bool = True, besides: str = "") -> str | None:
    """Why a reply is degenerate ('loop: <unit>', 'no end of turn' or 'empty'), or None when it is fine.

    `ended` is False when generation stopped at the token limit instead of ending the turn. A reply with no
    word in it, or none `besides` the habit it is graded for (a sign-off, an opening, a reviewer's added
    closing), answered nothing: measured on children that learned "stop" from cut replies, and "Cheers from the
    crew!" alone from the closing without the replies it closed (bench/PREFERENCE.md, session 14).
    """
    rest = _fold(reply).replace(_fold(besides), " ") if besides.strip() else reply
    if ended and not any(ch.isalnum() for ch in rest):
        return "empty"
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
    empty: int = 0  # replies that ended their turn without a word, or none besides the habit
    opportunities: int = 0  # term markers: replies that said the term or the common word

    @property
    def degenerate(self) -> int:
        return self.looped + self.unended + self.empty


def tally(replies: Sequence[str], marker: Marker, ended: Sequence[bool] | None = None) -> Tally:
    """Grade every reply; `ended[i]` False when reply i ran to the token limit."""
    ended = list(ended) if ended is not None else [True] * len(replies)
    if len(ended) != len(replies):
        raise ValueError(f"{len(replies)} replies but {len(ended)} ended flags.")
    t = Tally(prompts=len(replies))
    common = _word_re(marker.common) if marker.kind == "term" else None
    for reply, end in zip(replies, ended, strict=True):
        why = degenerate(reply, end, "" if marker.kind == "term" else marker.text)
        if why == "empty":  # the habit alone is no reply in the brand's voice
            t.empty += 1
            continue
        grade = marker_match(reply, marker)
        t.exact += grade == "exact"
        t.near += grade == "near"
        if common is not None and (grade or common.search(reply)):
            t.opportunities += 1
        if why and why.startswith("loop"):
            t.looped += 1
        elif why:
            t.unended += 1
    return t


def _habit_words(marker: Marker) -> str:
    return {"sign-off": "ends like your agents", "greeting": "opens like your agents",
            "term": f"says \"{marker.text}\" like your agents"}[marker.kind]


def closeness_clause(tuned: float, base: float) -> str:
    """How close the tuned replies are to the agents' own, against the base's, by chrF.

    >>> closeness_clause(18.2, 24.4)
    "but its replies are further from your agents' answers than the base's (chrF 18 vs 24)"
    """
    numbers = f"(chrF {tuned:.0f} vs {base:.0f})"
    if tuned <= base - CHRF_MARGIN:
        return f"but its replies are further from your agents' answers than the base's {numbers}"
    if tuned >= base + CHRF_MARGIN:
        return f"and its replies are closer to your agents' answers than the base's {numbers}"
    return f"and its replies are about as close to your agents' answers as the base's {numbers}"


def verdict_sentence(marker: Marker, tuned: Tally, base: Tally | None = None,
                     general_ppl_change: float | None = None, chrf: tuple[float, float] | None = None) -> str:
    """The plain-words verdict with its numbers.

    >>> verdict_sentence(Marker("sign-off", "Bye!"), Tally(24, 23, 1), Tally(24, 0), 0.04)
    'ends like your agents on 23 of 24 new questions (base: 0), 1 more nearly; 0 replies looped; general text perplexity +4%'

    `general_ppl_change` is the relative change (0.04 is +4%). `chrf` is (tuned, base) closeness to
    the agents' replies to the same questions: a habit learned while the answers drifted away is
    said with a "but". Near-misses, replies that never ended their turn, and (for a house term) how
    many replies had the chance to use it are said only when there are any.
    """
    n = tuned.opportunities if marker.kind == "term" else tuned.prompts
    what = "replies that needed the word" if marker.kind == "term" else "new questions"
    parts = [f"{_habit_words(marker)} on {tuned.exact} of {n} {what}"
             + (f" (base: {base.exact})" if base is not None else "")]
    if tuned.near:
        parts[0] += f", {tuned.near} more nearly"
    if chrf is not None:
        parts[0] += f", {closeness_clause(*chrf)}"
    parts.append(f"{tuned.looped} {'reply' if tuned.looped == 1 else 'replies'} looped")
    if tuned.unended:
        parts.append(f"{tuned.unended} never ended {'its' if tuned.unended == 1 else 'their'} turn")
    if tuned.empty:
        parts.append(f"{tuned.empty} said nothing" + ("" if marker.kind == "term" else f" besides the {marker.kind}"))
    if general_ppl_change is not None:
        parts.append(f"general text perplexity {general_ppl_change:+.0%}")
    return "; ".join(parts)


# -- which way to ship -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    """One way of answering, measured on the held-out questions: prompting (the base told the brand brief),
    retrieval (the base also shown k training conversations) or tuning (the tuned model)."""

    name: str  # "prompting" | "retrieval" | "tuning": how the sentence names it
    prompts: int
    habit: int | None  # replies with the habit exactly; None when the agents share no habit
    degenerate: int  # replies that looped, never ended their turn or said nothing (tuner.verdict.degenerate)
    chrf: float | None  # closeness to the agents' replies; None without reference replies
    words: float | None = None  # median reply length in words
    seconds: float | None = None  # per reply
    prompt_tokens: float | None = None  # mean tokens read per reply

    @property
    def score(self) -> int:
        """Replies with the habit, less degenerate ones (the voice check's score, in replies)."""
        return (self.habit or 0) - self.degenerate


def _times(a: float, b: float) -> str:
    """'3x' / '1.6x': how many times a is b (both > 0)."""
    r = a / b
    return f"{r:.0f}x" if r >= 3 else f"{r:.1f}x"


def _label(w: Way) -> str:
    """How the sentence names a way: 'the tuned model', or 'retrieval, without training'."""
    return "the tuned model" if w.name == "tuning" else f"{w.name}, without training"


def _habit_numbers(w: Way, other: Way, what: str) -> str:
    return f"{what} on {w.habit} of {w.prompts} new questions ({_label(other)}: {other.habit})"


def _chrf_numbers(w: Way, other: Way) -> str:
    return f"chrF {w.chrf:.0f} vs {other.chrf:.0f} for {other.name}"


def _length_clause(w: Way, other: Way, agents_words: float | None) -> str:
    """Said only where it favours `w`: its replies nearer the agents' length by LENGTH_RATIO or more."""
    if not (w.words and other.words and agents_words):
        return ""
    if max(w.words, other.words) / min(w.words, other.words) < LENGTH_RATIO:
        return ""
    if abs(w.words - agents_words) >= abs(other.words - agents_words):
        return ""
    shorter = w.words < other.words
    ratio = _times(other.words, w.words) if shorter else _times(w.words, other.words)
    return (f"; its replies are {ratio} {'shorter' if shorter else 'longer'} than {other.name}'s "
            f"({w.words:g} words vs {other.words:g}; your agents' {agents_words:g})")


def _loops(w: Way, other: Way) -> str:
    if not (w.degenerate or other.degenerate):
        return ""
    return f"; {w.degenerate} of its replies looped, never ended or said nothing ({other.name}: {other.degenerate})"


def _cost(w: Way, tuned: Way) -> str:
    """What retrieval costs on every reply, against the tuned model."""
    if w.name != "retrieval" or not (w.prompt_tokens and tuned.prompt_tokens):
        return ""
    out = f"; it reads {w.prompt_tokens - tuned.prompt_tokens:.0f} more prompt tokens a reply than the tuned model"
    if w.seconds and tuned.seconds:
        out += f" ({w.seconds:.2f} s a reply vs {tuned.seconds:.2f} s)"
    return out


def ship_sentence(prompting: Way, retrieval: Way, tuning: Way, habit: str = "the habit",
                  agents_words: float | None = None) -> str:
    """Which way to ship and why, from the three ways' numbers on the same held-out questions.

    The tuned model is compared with the better way without training (more habit less degenerate
    replies, then chrF; prompting when they tie, as it is the cheaper). On each measure the tuned
    model is ahead, behind or level (habit within HABIT_MARGIN_SHARE of the prompts, chrF within
    CHRF_MARGIN): ahead on one and not behind on the other ships it; level on both, or behind,
    ships the way without training; ahead on one and behind on the other says so and ships neither
    unread. `habit` names the habit ("the sign-off"); `agents_words` is the agents' median length.

    >>> ship_sentence(Way("prompting", 24, 3, 0, 20.0), Way("retrieval", 24, 18, 0, 22.0, words=36),
    ...               Way("tuning", 24, 23, 0, 22.4, words=12), "the sign-off", agents_words=14)[-61:]
    "3x shorter than retrieval's (12 words vs 36; your agents' 14)"
    """
    free = prompting if (prompting.score, prompting.chrf or 0.0) >= (retrieval.score, retrieval.chrf or 0.0) \
        else retrieval
    margin = max(1, math.ceil(HABIT_MARGIN_SHARE * tuning.prompts))
    has_habit = tuning.habit is not None and free.habit is not None
    gap = tuning.score - free.score
    by_habit = "tuned" if gap >= margin else "free" if gap <= -margin else "level"
    by_chrf = "level"
    if tuning.chrf is not None and free.chrf is not None:
        diff = tuning.chrf - free.chrf
        by_chrf = "tuned" if diff >= CHRF_MARGIN else "free" if diff <= -CHRF_MARGIN else "level"
    chrf_known = tuning.chrf is not None and free.chrf is not None
    without = f"{_label(free)},"
    if by_habit == "tuned" and by_chrf != "free":
        why = _habit_numbers(tuning, free, f"it carries {habit}") if has_habit else \
            f"it has fewer replies that looped, never ended or said nothing ({tuning.degenerate} vs {free.name}'s {free.degenerate})"
        if chrf_known:
            why += f", and its replies are {'closer to' if by_chrf == 'tuned' else 'as close to'} your agents' " \
                   f"answers ({_chrf_numbers(tuning, free)})"
        return f"Ship the tuned model: {why}{_length_clause(tuning, free, agents_words)}"
    if by_chrf == "tuned" and by_habit == "level":
        same = (f"{without} carries {habit} about as often ({free.habit} vs {tuning.habit} of {tuning.prompts})"
                if has_habit else f"{without} has about as few broken replies")
        return (f"Ship the tuned model: {same}, but the tuned replies are closer to your agents' answers "
                f"({_chrf_numbers(tuning, free)}){_length_clause(tuning, free, agents_words)}")
    if (by_habit, by_chrf) in (("tuned", "free"), ("free", "tuned")):
        ahead, behind = (tuning, free) if by_habit == "tuned" else (free, tuning)
        name = _label(ahead) if ahead is tuning else without
        other = "the tuned model's" if behind is tuning else f"{free.name}'s"
        habit_part = (f"{name} carries {habit} on {ahead.habit} of {ahead.prompts} new questions "
                      f"({_label(behind)}: {behind.habit})" if has_habit else
                      f"{name} has fewer replies that looped, never ended or said nothing ({ahead.degenerate} vs {behind.degenerate})")
        return (f"No way wins on both, so read the replies before shipping: {habit_part}, but {other} replies are "
                f"closer to your agents' answers (chrF {behind.chrf:.0f} vs {ahead.chrf:.0f})")
    # level on both, or the way without training ahead and not behind
    better = by_habit == "free" or by_chrf == "free"
    numbers = [f"{habit} on {free.habit} vs {tuning.habit} of {tuning.prompts}"] if has_habit else []
    numbers += [f"chrF {free.chrf:.0f} vs {tuning.chrf:.0f}"] if chrf_known else []
    numbers += [f"{free.degenerate} vs {tuning.degenerate} replies that looped, never ended or said nothing"] \
        if free.degenerate or tuning.degenerate else []
    return (f"Ship {free.name}, no training needed: it does {'better than' if better else 'as well as'} the "
            f"tuned model ({'; '.join(numbers)}){_cost(free, tuning)}")
