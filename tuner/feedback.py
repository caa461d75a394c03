"""Reviewers' judgements of a run's replies, and the preference pairs they make.

Each judgement is one JSON line in the run's feedback.jsonl (`Run.feedback_file`):

    {"kind": "thumb" | "edit" | "vote" | "imported",
     "prompt": [{"role", "content"}, ...],            the conversation up to the reply (history included)
     "replies": [{"source": "tuned", "text": ...}, ...],  what was shown, and which column/run each came from
     "judgement": {"thumb": "up"} | {"edited": text} | {"choice": "A"|"B"|"both bad", "a": source, "b": source}
                  | {"chosen": text, "rejected": text},
     "time": ISO 8601, "reviewer": name or null, "id": hex}

An edit makes the reviewer's text the chosen reply and the model's the rejected one; an A/B vote makes
the winner chosen and the loser rejected ("both bad" makes no pair). `pairs(run)` turns the file into
trl's preference format, `{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`.
Light module: standard library only (the page and the CLI import it without torch).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import DataError, TunerError
from tuner.messages import Message, validate_messages, write_jsonl
from tuner.runs import Run

MIN_PAIRS = 10  # below this many pairs DPO has too little to learn from: the button stays off
TUNED = "tuned"  # the source name of the run's own replies (the playground's tuned column)
BASE = "base"
CHOICES = ("A", "B", "both bad")
FEW_HELD_OUT = 20  # fewer held-out pairs than this prove little about preference accuracy
Z95 = 1.959964  # two-sided 95% normal quantile, for the Wilson interval


# -- recording ------------------------------------------------------------------------------------


def _as_run(run: Run | str | Path) -> Run:
    if isinstance(run, Run):
        return run
    from tuner.runs import resolve

    return resolve(run)


def _check_prompt(prompt: Any) -> list[Message]:
    problem = validate_messages(prompt)
    if problem is not None:
        raise TunerError(f"The prompt is not a conversation: {problem}")
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise TunerError("The prompt must end with the customer's (user) message, and it must not be empty.")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _append(run: Run | str | Path, kind: str, prompt: Any, replies: list[dict[str, str]],
            judgement: dict[str, Any], reviewer: str | None) -> dict[str, Any]:
    """Append one judgement (locked, one write: concurrent reviewers never interleave lines)."""
    record = {"kind": kind, "prompt": _check_prompt(prompt), "replies": replies, "judgement": judgement,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reviewer": (reviewer or "").strip() or None,
              "id": secrets.token_hex(6)}
    path = _as_run(run).feedback_file
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def source_label(source: str, run_id: str | None, parent: str | None = None) -> str:
    """Who wrote a reply, in words, as the page names it: the base model, this run, its parent, another run."""
    if source == BASE:
        return "the base model"
    if source == run_id or (source == TUNED and run_id):
        return f"{run_id} (this run)"
    return f"{source} (its parent)" if parent and source == parent else source


def record_thumb(run: Run | str | Path, prompt: list[Message], reply: str, up: bool, source: str = TUNED,
                 reviewer: str | None = None) -> dict[str, Any]:
    """A thumbs up (`up=True`) or down on one reply (Gradio's chatbot `.like`)."""
    return _append(run, "thumb", prompt, [{"source": source, "text": reply}],
                   {"thumb": "up" if up else "down"}, reviewer)


def record_edit(run: Run | str | Path, prompt: list[Message], reply: str, edited: str, source: str = TUNED,
                reviewer: str | None = None) -> dict[str, Any]:
    """"Write the better reply": the edit becomes the chosen reply, the model's the rejected one."""
    if not edited.strip():
        raise TunerError("The better reply is empty. Fix: write the reply you would have sent.")
    if edited.strip() == reply.strip():
        raise TunerError("The edit is the same as the model's reply. Fix: change it, or give a thumbs up instead.")
    return _append(run, "edit", prompt, [{"source": source, "text": reply}], {"edited": edited}, reviewer)


def record_vote(run: Run | str | Path, prompt: list[Message], a: dict[str, str], b: dict[str, str], choice: str,
                reviewer: str | None = None, pair: str | None = None) -> dict[str, Any]:
    """An A/B vote: `a` and `b` are {"source", "text"} as shown; `choice` is "A", "B" or "both bad"; `pair` the
    id the pair was shown with."""
    if choice not in CHOICES:
        raise TunerError(f"The vote is {', '.join(CHOICES[:-1])} or {CHOICES[-1]}, got {choice!r}.")
    shown = [{"source": str(r["source"]), "text": str(r["text"])} for r in (a, b)]
    judgement = {"choice": choice, "a": shown[0]["source"], "b": shown[1]["source"], **({"pair": pair} if pair else {})}
    return _append(run, "vote", prompt, shown, judgement, reviewer)


@dataclass
class BlindPair:
    """Two sources' replies to one prompt, shown as A and B in random order; the sources stay hidden until
    `vote`. Plain data, so the page can keep it in gr.State. `id` is shown with the pair: a vote names it."""

    prompt: list[Message]
    a: dict[str, str]
    b: dict[str, str]
    voted: str | None = None
    revealed: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(3))

    @property
    def shown(self) -> tuple[str, str]:
        """What the reviewer sees: the texts of A and B, no sources."""
        return self.a["text"], self.b["text"]

    def vote(self, run: Run | str | Path, choice: str, reviewer: str | None = None) -> dict[str, Any]:
        """Record the vote once, then reveal: {"A": source, "B": source, "winner": source or None, "choice"}."""
        if self.voted is not None:
            raise TunerError("This pair already has a vote. Fix: ask a new prompt for the next vote.")
        record_vote(run, self.prompt, self.a, self.b, choice, reviewer, self.id)
        self.voted = choice
        winner = {"A": self.a["source"], "B": self.b["source"]}.get(choice)
        self.revealed = {"A": self.a["source"], "B": self.b["source"], "winner": winner, "choice": choice}
        return self.revealed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def blind_pair(prompt: list[Message], replies: dict[str, str], rng: random.Random | None = None) -> BlindPair:
    """Shuffle two sources' replies ({source: text}) into A and B for a blind vote."""
    if len(replies) != 2:
        raise TunerError(f"A blind vote compares two sources, got {len(replies)}: {', '.join(replies) or 'none'}.")
    order = list(replies.items())
    (rng or random.SystemRandom()).shuffle(order)
    (sa, ta), (sb, tb) = order
    return BlindPair(_check_prompt(prompt), {"source": sa, "text": ta}, {"source": sb, "text": tb})


# -- reading and reporting ------------------------------------------------------------------------


def records(run: Run | str | Path) -> list[dict[str, Any]]:
    """Every judgement in the run's feedback.jsonl, oldest first (a torn last line is skipped)."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(_as_run(run).feedback_file, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("kind") and isinstance(rec.get("prompt"), list):
                    out.append(rec)
    return out


def wilson(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a win rate (95% by default); (0, 1) when there are no votes.

    >>> tuple(round(x, 3) for x in wilson(8, 10))
    (0.49, 0.943)
    """
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _is_tuned(source: str, run: Run) -> bool:
    return source in (TUNED, run.id)


def report(run: Run | str | Path) -> dict[str, Any]:
    """Counts, win rate per source (Wilson 95% interval; "both bad" is a loss for both), the prompts where
    the tuned bot lost a vote, and how many pairs there are for DPO."""
    run = _as_run(run)
    recs = records(run)
    counts = {"judgements": len(recs), "thumbs_up": 0, "thumbs_down": 0, "edits": 0, "votes": 0, "both_bad": 0,
              "imported": 0}
    tally: dict[str, list[int]] = {}
    lost = []
    for rec in recs:
        kind, j = rec["kind"], rec.get("judgement") or {}
        if kind == "thumb":
            counts["thumbs_up" if j.get("thumb") == "up" else "thumbs_down"] += 1
        elif kind == "edit":
            counts["edits"] += 1
        elif kind == "imported":
            counts["imported"] += 1
        elif kind == "vote":
            counts["votes"] += 1
            counts["both_bad"] += j.get("choice") == "both bad"
            winner = {"A": j.get("a"), "B": j.get("b")}.get(j.get("choice"))
            for source in (j.get("a"), j.get("b")):
                t = tally.setdefault(str(source), [0, 0])
                t[0] += source == winner
                t[1] += 1
            tuned = [s for s in (j.get("a"), j.get("b")) if _is_tuned(str(s), run)]
            if tuned and winner not in tuned:
                lost.append({"prompt": rec["prompt"][-1]["content"], "choice": j.get("choice"), "winner": winner,
                             "time": rec.get("time"), "reviewer": rec.get("reviewer")})
    win_rates = {}
    for source, (wins, n) in sorted(tally.items()):
        low, high = wilson(wins, n)
        win_rates[source] = {"wins": wins, "votes": n, "rate": wins / n if n else None,
                             "low": round(low, 4), "high": round(high, 4)}
    n_pairs = len(pairs(run, recs))
    return {"counts": counts, "win_rates": win_rates, "lost": lost, "pairs": n_pairs,
            "unpaired": len(unpaired(run, recs)), "enough": n_pairs >= MIN_PAIRS, "need": pairs_needed(n_pairs)}


def pairs_needed(n: int, minimum: int = MIN_PAIRS) -> str | None:
    """The message that blocks preference tuning below `minimum` pairs, or None when there are enough."""
    if n >= minimum:
        return None
    return (f"{n} preference pair{'s' if n != 1 else ''} so far; preference tuning needs at least {minimum}: "
            f"{minimum - n} more (an A/B vote for A or B, or an edited reply, makes one).")


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _pair_of(rec: dict[str, Any]) -> tuple[str, str] | None:
    j, replies = rec.get("judgement") or {}, rec.get("replies") or []
    if rec["kind"] == "edit" and replies:
        return j.get("edited"), replies[0].get("text")
    if rec["kind"] == "vote" and len(replies) == 2 and j.get("choice") in ("A", "B"):
        win = 0 if j["choice"] == "A" else 1
        return replies[win].get("text"), replies[1 - win].get("text")
    if rec["kind"] == "imported":
        return j.get("chosen"), j.get("rejected")
    return None


def pairs(run: Run | str | Path, recs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The run's judgements as trl preference pairs (edits, decided votes, imported pairs), oldest first."""
    out = []
    for rec in records(run) if recs is None else recs:
        pair = _pair_of(rec)
        if pair is None or not all(isinstance(t, str) and t.strip() for t in pair) or pair[0].strip() == pair[1].strip():
            continue
        out.append({"prompt": rec["prompt"], "chosen": _assistant(pair[0]), "rejected": _assistant(pair[1])})
    return out


def unpaired(run: Run | str | Path, recs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Thumbs as trl's unpaired format for KTO: {"prompt", "completion", "label"} (True for a thumbs up)."""
    out = []
    for rec in records(run) if recs is None else recs:
        if rec["kind"] == "thumb" and rec.get("replies"):
            out.append({"prompt": rec["prompt"], "completion": _assistant(rec["replies"][0]["text"]),
                        "label": (rec.get("judgement") or {}).get("thumb") == "up"})
    return out


# -- preference files -----------------------------------------------------------------------------


def export_pairs(run: Run | str | Path, path: str | Path) -> int:
    """Write the run's pairs to a JSONL file in trl's preference format; returns how many."""
    return write_jsonl(path, pairs(run))


def _completion(value: Any, name: str) -> tuple[list[Message] | None, str | None]:
    if isinstance(value, str):
        value = _assistant(value)
    if not isinstance(value, list) or not value:
        return None, f'"{name}" must be a reply: a text, or [{{"role": "assistant", "content": ...}}]'
    problem = validate_messages(value)
    if problem is not None or value[-1]["role"] != "assistant":
        return None, f'"{name}" must end with an assistant message ({problem or "the last one is not"})'
    return [{"role": m["role"], "content": m["content"]} for m in value], None


def check_pair(row: Any) -> tuple[dict[str, Any] | None, str | None]:
    """One preference row, normalized to lists of messages, or (None, what is wrong and the fix)."""
    if not isinstance(row, dict):
        return None, 'expected an object {"prompt": [...], "chosen": [...], "rejected": [...]}.'
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return None, (f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}. Fix: every line needs "
                      '"prompt", "chosen" and "rejected".')
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if (not isinstance(prompt, list) or not prompt or validate_messages(prompt) is not None
            or not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in prompt)):
        return None, ('empty or malformed prompt. Fix: give the conversation before the reply, e.g. '
                      '[{"role": "user", "content": "Where is my order?"}].')
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        return None, "the prompt must end with a non-empty user message. Fix: end it with the customer's question."
    chosen, problem = _completion(row["chosen"], "chosen")
    if problem is None:
        rejected, problem = _completion(row["rejected"], "rejected")
    if problem is not None:
        return None, problem + "."
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return None, "chosen or rejected is empty. Fix: give both replies."
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return None, "chosen and rejected are the same reply, so there is nothing to prefer. Fix: remove the line."
    clean = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return {"prompt": clean, "chosen": chosen, "rejected": rejected}, None


@dataclass
class PairFile:
    """A preference file read line by line: the valid pairs (each with its line) and the problems."""

    path: str
    rows: list[dict[str, Any]]
    errors: list[DataError]

    def raise_errors(self, limit: int = 5) -> None:
        """One DataError naming the first `limit` bad lines (and how many more), if there are any."""
        if not self.errors:
            return
        lines = "; ".join(str(e) for e in self.errors[:limit])
        more = f" (and {len(self.errors) - limit} more)" if len(self.errors) > limit else ""
        raise DataError(f"{len(self.errors)} bad line(s){more}: {lines}")


def read_pairs(path: str | Path) -> PairFile:
    """Read a preference JSONL file; every valid line is kept, every bad one becomes a DataError naming it."""
    path = Path(path)
    rows, errors = [], []
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 (closed by the with below; a missing file has its own message)
    except OSError as exc:
        raise DataError(f"cannot open ({exc.strerror}).", file=str(path)) from None
    with fh:
        try:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    errors.append(DataError(f"not valid JSON ({exc.args[0]}). Fix: one JSON object per line.",
                                            file=str(path), line=number))
                    continue
                row, problem = check_pair(value)
                if problem is not None:
                    errors.append(DataError(problem, file=str(path), line=number))
                else:
                    rows.append({**row, "_line": number})
        except UnicodeDecodeError:
            errors.append(DataError("is not UTF-8 text. Fix: save it as UTF-8.", file=str(path)))
    return PairFile(str(path), rows, errors)


def import_pairs(run: Run | str | Path, path: str | Path, reviewer: str | None = None) -> PairFile:
    """Add a preference file's valid pairs to the run's feedback (kind "imported"); the bad lines are
    returned in `errors`, each naming its line, and nothing valid is dropped."""
    found = read_pairs(path)
    for row in found.rows:
        _append(run, "imported", row["prompt"], [{"source": f"file:{Path(path).name}",
                                                  "text": row["rejected"][-1]["content"]}],
                {"chosen": row["chosen"][-1]["content"], "rejected": row["rejected"][-1]["content"],
                 "line": row["_line"]}, reviewer)
    return found


def split(rows: list[dict[str, Any]], held_out: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded (train, held-out) split of preference rows: the same rows and seed give the same split.
    At least one row is held out when there are two or more."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1 if len(rows) > 1 and held_out > 0 else 0, round(held_out * len(rows))), len(rows) - 1)
    held = set(order[:max(n_held, 0)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def strip_lines(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the bookkeeping `_line` key (as trl and files want them)."""
    return [{k: v for k, v in r.items() if k != "_line"} for r in rows]


def pairs_sentence(pm: dict[str, Any], parent: str | None = None, method: str = "DPO") -> str:
    """Held-out preference accuracy before (the parent) -> after (the child), with its 95% interval, and what so
    few pairs prove. `pm` is a preference run's status["preference_metrics"]."""
    b, a, n = pm.get("before") or {}, pm.get("after") or {}, pm.get("held_out_pairs") or 0
    if not n:
        return "No held-out pairs to score."
    interval = a.get("interval")
    before = f" ({parent})" if parent else ""
    text = (f"on {n} held-out pairs (never trained on), the reviewers' choice got the higher reward "
            f"{b.get('accuracy', 0):.0%} of the time before{before} and {a.get('accuracy', 0):.0%} after ({method})")
    if interval:
        text += f" (95% interval {interval[0]:.0%}-{interval[1]:.0%})"
    text += f"; the reward margin went from {b.get('margin', 0):+.3f} to {a.get('margin', 0):+.3f}"
    if n < FEW_HELD_OUT:
        text += f"; {n} held-out pairs prove little (fewer than {FEW_HELD_OUT})"
    return text[0].upper() + text[1:] + "."
