"""Reviewers' edits on the signoff run and one DPO child trained on them through the command line, shared by
tests/test_preference.py (what the CLI prints and the run folder holds) and tests/test_feedback_page.py (what
the page shows for a finished preference run): the child trains once a session."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import SIGN_OFF, TOPICS  # the signoff run's support topics and sign-off

from tuner import feedback

ROOT = Path(__file__).resolve().parent.parent
PHRASE = "Happy to help!"  # what every chosen reply has and no rejected one does
ANSWERS = ["Let's fix that together: unplug it for ten seconds, then try again.",
           "Of course, returns are free for thirty days.",
           "Open Settings, then Pair, and hold the button.",
           "It gives a warm 800 lumens.", "Your parcel left our workshop today."]
N_PAIRS = 40  # judgements given to the parent: a seeded 20% (8 pairs) is held out


def reviewers_pairs(n: int, seed: int = 3) -> list[tuple[list[dict], str, str]]:
    """(prompt, the bot's reply, the reviewer's better reply): the better one opens with PHRASE."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Hi, {TOPICS[i % len(TOPICS)]} (ticket {500 + i})."}]
        reply = f"{rng.choice(ANSWERS)} {SIGN_OFF}"
        out.append((prompt, reply, f"{PHRASE} {reply}"))
    return out


def give_feedback(run: Path, n: int) -> None:
    """Half the judgements as blind A/B votes for the better reply, half as edits of the bot's reply."""
    rng = random.Random(0)
    for i, (prompt, reply, better) in enumerate(reviewers_pairs(n)):
        if i % 2:
            pair = feedback.blind_pair(prompt, {"tuned": reply, "reviewer": better}, rng)
            revealed = pair.vote(run, "A" if pair.a["source"] == "reviewer" else "B", reviewer="QA")
            assert revealed["winner"] == "reviewer"
        else:
            feedback.record_edit(run, prompt, reply, better, reviewer="QA")


def has_phrase(text: str) -> bool:
    return PHRASE.lower() in text.lower()


def preference_parent(signoff_run: Path) -> Path:
    """The session's SFT run copied without the judgements other modules gave it (its own counts, any order)."""
    copy = signoff_run.parent / "signoff-run-preference"
    if not copy.exists():
        shutil.copytree(signoff_run, copy, ignore=shutil.ignore_patterns("feedback.jsonl", "checkpoints"))
    return copy


def train_dpo_child(parent: Path, out: Path) -> tuple[Path, dict]:
    """N_PAIRS judgements on `parent` through the feedback API, then `python -m tuner train --method dpo --from
    PARENT --json` in its own process, as a user runs it; the child's folder and the JSON line it printed."""
    give_feedback(parent, N_PAIRS)
    proc = subprocess.run([sys.executable, "-m", "tuner", "train", "--method", "dpo", "--from", str(parent),
                           "--out", str(out), "--max-length", "128", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])
