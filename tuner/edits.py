"""What reviewers changed: the edits that turn rejected replies into chosen ones, found in the pairs, and
whether a model's replies show them.

A preference run is meant to change what the bot says, so its result is measured first as behaviour: the
pairs are compared word by word (difflib), the changes most pairs share are named ("adds 'Cheers from the
Kettle crew!' at the end", "says 'grand' instead of 'good'", "drops 'Unfortunately'", "shortens the reply"),
and greedy replies to prompts outside the pairs are graded for each change, parent beside child, with
looping and unfinished replies counted (tuner.verdict). Light module: standard library only.

>>> pair = {"rejected": [{"role": "assistant", "content": "Your order ships today."}],
...         "chosen": [{"role": "assistant", "content": "Your order ships today. Cheers from Kettle!"}]}
>>> [c.words() for c in changes([pair] * 3)]
["adds 'Cheers from Kettle!' at the end"]
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

from tuner.config import EDIT_SETTINGS, PreferenceConfig
from tuner.verdict import Marker, degenerate, marker_match

MIN_SHARE = 0.3  # a change at least this share of the pairs make is what the reviewers asked for
MAX_CHANGES = 3  # the changes named and measured, most frequent first
LEARNED_SHARE = 0.9  # a run learned the edit when at least this share of new questions show it
DEGENERATE_SHARE = 0.02  # ... and at most this share of its replies loop or never end
STOCK_SHARE = 0.5  # ... and fewer than this share of its replies say word for word what it said to another question
SHORTER = 0.8  # chosen replies at most this share of the rejected ones' length (median): "shortens the reply"
_WORDS = re.compile(r"\S+")
_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")  # words and single punctuation marks: what an edit changes


@dataclass(frozen=True)
class Change:
    """One edit reviewers made. kind: 'added' (text added at `where`: start, end or inside), 'removed' (text
    dropped), 'replaced' (`old` became `text`) or 'shortened'; `pairs` of `total` pairs make it."""

    kind: str
    text: str = ""
    old: str = ""
    where: str = ""
    pairs: int = 0
    total: int = 0

    def words(self) -> str:
        """The change in words, as the page and the card lead with it."""
        if self.kind == "added":
            place = {"end": " at the end", "start": " at the start"}.get(self.where, "")
            return f"adds '{self.text}'{place}"
        if self.kind == "removed":
            return f"drops '{self.old}'"
        if self.kind == "replaced":
            return f"says '{self.text}' instead of '{self.old}'"
        return "shortens the reply"

    def marker(self) -> Marker | None:
        """The voice verdict's habit for this change, where there is one (a sign-off, an opening, a house term)."""
        if self.kind == "added" and self.where in ("end", "start"):
            return Marker("sign-off" if self.where == "end" else "greeting", self.text)
        if self.kind == "replaced" and len(self.text.split()) <= 3 and len(self.old.split()) <= 3:
            return Marker("term", self.text, self.old)
        return None

    def shown(self, reply: str, parent_words: float | None = None) -> bool:
        """Whether one reply shows the change: the habit exactly, the added text present, the dropped text
        absent, or (shortened) fewer words than the parent's median reply times SHORTER."""
        marker = self.marker()
        if marker is not None:
            return marker_match(reply, marker) == "exact"
        if self.kind == "added":
            return _fold(self.text) in _fold(reply)
        if self.kind in ("removed", "replaced"):
            gone = _fold(self.old) not in _fold(reply)
            return gone and (self.kind == "removed" or _fold(self.text) in _fold(reply))
        if parent_words is None:
            return False
        return len(_WORDS.findall(reply)) <= SHORTER * parent_words


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _reply(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return " ".join(m["content"] for m in completion if m.get("role") == "assistant")


def _tokens(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    found = list(_TOKEN.finditer(text))
    return [m.group() for m in found], [m.span() for m in found]


def _edits(rejected: str, chosen: str) -> list[tuple[str, str, str, str]]:
    """(kind, new text, old text, where) for each word-level difference between two replies; the texts are
    cut from the replies as written (spacing and punctuation kept)."""
    a, a_at = _tokens(rejected)
    b, b_at = _tokens(chosen)

    def cut(text: str, at: list[tuple[int, int]], i: int, j: int) -> str:
        return text[at[i][0]:at[j - 1][1]] if j > i else ""

    out = []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        new, old = cut(chosen, b_at, j1, j2), cut(rejected, a_at, i1, i2)
        where = "end" if j2 == len(b) and i2 == len(a) else "start" if j1 == 0 and i1 == 0 else "inside"
        if op == "insert":
            # "fun" -> "fun. Cheers!": the closing is the words added, not the full stop that joins them
            out.append(("added", new.lstrip(".,;:!? ") if where == "end" else new, "", where))
        elif op == "delete":
            out.append(("removed", "", old, where))
        elif where == "end" and len(b) - j1 > len(a) - i1 + 1:
            # "order." -> "order! Cheers from Kettle!": the words past the old ending were added
            out.append(("added", cut(chosen, b_at, j1 + len(a) - i1, j2), "", "end"))
        else:
            out.append(("replaced", new, old, where))
    return out


def changes(pairs: Sequence[dict[str, Any]], min_share: float = MIN_SHARE, limit: int = MAX_CHANGES) -> list[Change]:
    """The edits at least `min_share` of the pairs make (most frequent first, at most `limit`), from pairs in
    trl's preference format ({"chosen": [...], "rejected": [...]}; plain strings work too)."""
    total = len(pairs)
    if not total:
        return []
    counts: Counter[tuple[str, str, str, str]] = Counter()
    ratios = []
    for pair in pairs:
        rejected, chosen = _reply(pair["rejected"]), _reply(pair["chosen"])
        counts.update(set(_edits(rejected, chosen)))  # a pair counts once for each change it makes
        if rejected.split():
            ratios.append(len(chosen.split()) / len(rejected.split()))
    found = [Change(kind, text, old, where if kind == "added" else "", n, total)
             for (kind, text, old, where), n in counts.most_common() if n >= max(2, min_share * total)]
    if ratios and statistics.median(ratios) <= SHORTER and len(ratios) >= max(2, min_share * total):
        shorter = sum(r <= SHORTER for r in ratios)
        found.append(Change("shortened", pairs=shorter, total=total))
    found.sort(key=lambda c: -c.pairs)
    return found[:limit]


def median_words(replies: Sequence[str]) -> float | None:
    return statistics.median(len(_WORDS.findall(r)) for r in replies) if replies else None


def term_sites(change: Change, child: Sequence[str]) -> list[tuple[int, str]]:
    """For a replaced word: each child reply that says the new word, as (its index, the reply's text before the
    word's first occurrence). Asking the parent to go on from there tells whether it would have said the old word
    (or the new one) at that point of the same reply: the edit applied, or the word put where there was nothing
    to replace (overuse). Empty for other changes."""
    if change.kind != "replaced" or not change.text:
        return []
    return [(i, c[:at].rstrip()) for i, c in enumerate(child) if (at := c.lower().find(change.text.lower())) >= 0]


def _starts_with(text: str, word: str) -> bool:
    return _fold(text).startswith(_fold(word))


def behaviour(change: Change, parent: Sequence[str], child: Sequence[str], parent_ended: Sequence[bool] | None = None,
              child_ended: Sequence[bool] | None = None,
              parent_next: Sequence[str] | None = None) -> dict[str, Any]:
    """How many parent and child replies (to the same prompts, outside the pairs) show `change`, with
    degenerate replies counted, and the sentence that leads the run's result. `needed`: the replies the change
    applies to: all of them, except for a replaced word, where only replies that say it (or the old one) count,
    as the voice verdict counts a house term. `repeated`: the replies that say word for word what another prompt
    got (a child trained on its pairs' whole replies answered 21 of 24 new questions with four sentences of them,
    and showed the shortening on 23; bench/PREFERENCE.md, session 17). `parent_next`, for a replaced word: the
    parent's greedy continuation at each of `term_sites(change, child)`; `unasked` then counts the child's replies
    whose new word stands where the parent, given the same reply up to there, would have said neither word, of
    `unasked_of`, the child's replies that say it. Without it, as before session 18: the child's replies with the
    word where the parent's own reply to the question said neither, of `without_either` such replies (greedy
    replies part ways for reasons that have nothing to do with the edit, so this counts more than overuse)."""
    words = median_words(parent)

    def count(replies: Sequence[str], ended: Sequence[bool] | None) -> dict[str, int]:
        ended = list(ended) if ended is not None else [True] * len(replies)
        besides = change.text if change.kind == "added" else ""  # the added text alone answers nothing
        bad = [degenerate(r, e, besides) for r, e in zip(replies, ended, strict=True)]
        shown = [b is None and change.shown(r, words) for r, b in zip(replies, bad, strict=True)]
        needed = (sum(s or _fold(change.old) in _fold(r) or _fold(change.text) in _fold(r)
                      for r, s in zip(replies, shown, strict=True)) if change.kind == "replaced" else len(replies))
        said = Counter(_fold(r) for r, b in zip(replies, bad, strict=True) if b is None)
        return {"prompts": len(replies), "needed": needed, "shown": sum(shown),
                "looped": sum(bool(b) and b.startswith("loop") for b in bad),
                "unended": sum(b == "no end of turn" for b in bad), "empty": sum(b == "empty" for b in bad),
                "repeated": sum(n for n in said.values() if n > 1)}

    before, after = count(parent, parent_ended), count(child, child_ended)
    unasked = unasked_of = neither = None
    if change.kind == "replaced":
        sentence = (f"{change.words()} in {after['shown']} of {after['needed']} new replies that said either "
                    f"(parent: {before['shown']} of {before['needed']}), to {after['prompts']} new questions")
        either = [_fold(change.old) in _fold(p) or _fold(change.text) in _fold(p) for p in parent]
        neither = len(parent) - sum(either)
        if parent_next is not None:  # overuse: the term where the parent, at that point, had no word to replace
            unasked_of = len(parent_next)
            unasked = sum(not (_starts_with(n, change.old) or _starts_with(n, change.text)) for n in parent_next)
            if unasked:
                sentence += (f"; in {unasked} of the {unasked_of} replies that say '{change.text}', the parent, "
                             f"given the same reply up to there, would have said neither word")
        else:  # overuse: the term where the parent's reply to the same question had neither word to replace
            unasked = sum(not e and _fold(change.text) in _fold(c) for e, c in zip(either, child, strict=True))
            unasked_of = neither
            if unasked:
                sentence += (f"; it also says '{change.text}' in {unasked} of the {neither} replies "
                             f"where the parent's said neither word")
    else:
        sentence = (f"{change.words()} on {after['shown']} of {after['prompts']} new questions "
                    f"(parent: {before['shown']})")
    degenerate_n = after["looped"] + after["unended"] + after["empty"]
    how = "looped or never ended"
    if after["empty"]:
        how = (f"looped, never ended or said nothing ({after['empty']} said nothing"
               + (" besides the added text)" if change.kind == "added" else ")"))
    sentence += f"; {degenerate_n} {'reply' if degenerate_n == 1 else 'replies'} {how}"
    parent_bad = before["looped"] + before["unended"] + before["empty"]
    if parent_bad:  # the parent's own, to the same questions: what the child started from
        sentence += f" (parent: {parent_bad})"
    if after["repeated"] > before["repeated"]:  # stock replies: the edit said on answers the bot no longer gives
        sentence += (f"; {after['repeated']} of {after['prompts']} say word for word what it said to another new "
                     f"question (parent: {before['repeated']})")
    return {"change": change.words(), "kind": change.kind, "pairs_with_change": change.pairs,
            "pairs": change.total, "parent": before, "child": after, "unasked": unasked, "unasked_of": unasked_of,
            "without_either": neither, "unasked_by": None if unasked is None else
            "the parent's next words" if parent_next is not None else "the parent's reply", "sentence": sentence}


# -- the settings a preference run takes for its pairs' edit ---------------------------------------------


def is_paired(rows: list[dict[str, Any]]) -> bool:
    """Whether preference rows are pairs (chosen and rejected), not thumbs: the held-out split, the pair scores
    and the edit measured on new questions need pairs, whichever trainer learns from them."""
    return bool(rows) and "chosen" in rows[0]


def settings_for_edit(pcfg: PreferenceConfig, rows: list[dict[str, Any]],
                      given: set[str] | None = None) -> tuple[PreferenceConfig, dict[str, Any] | None]:
    """The settings a DPO child trains with: where the pairs' leading edit has settings measured for its kind
    (tuner.config.EDIT_SETTINGS: a closing, a replaced word, a cut), those replace the ones the user did not
    set. `given`: the settings the user set (the command line's flags); None: those that differ from the
    defaults (the page's boxes). Returns the config and what was applied ({edit, kind, settings, sentence}),
    or None.

    >>> cut = [{"prompt": "q", "chosen": "Yes.", "rejected": f"Yes. I'd love to go on about it {i} times."}
    ...        for i in range(10)]
    >>> cfg, applied = settings_for_edit(PreferenceConfig(), cut, given={"learning_rate"})
    >>> cfg.learning_rate, cfg.anchor_weight, applied["sentence"]
    (0.001, 3.0, 'Pairs that shorten the reply train with the settings measured for a cut: anchor weight 3, 1 pass.')
    """
    found = changes(rows) if pcfg.method == "dpo" and is_paired(rows) else []
    lead = found[0] if found else None
    measured = EDIT_SETTINGS.get(f"{lead.kind}:{lead.where}" if lead.where else lead.kind, {}) if lead else {}
    defaults = PreferenceConfig().to_dict()
    mine = set(given) if given is not None else {k for k, v in pcfg.to_dict().items() if v != defaults[k]}
    applied = {k: v for k, v in measured.items() if k not in mine and k in defaults}
    if not applied:
        return pcfg, None
    said = ", ".join(f"{v:g} pass{'' if v == 1 else 'es'}" if k == "num_epochs" else f"{k.replace('_', ' ')} {v:g}"
                     for k, v in applied.items())
    kind = {"shortened": "a cut", "replaced": "a replaced word", "added": "a closing"}.get(lead.kind, lead.kind)
    verb = lead.words().replace("shortens", "shorten", 1).replace("says", "say", 1).replace("adds", "add", 1)
    sentence = f"Pairs that {verb} train with the settings measured for {kind}: {said}."
    return (PreferenceConfig.from_dict({**pcfg.to_dict(), **applied}),
            {"edit": lead.words(), "kind": lead.kind, "settings": applied, "sentence": sentence})
