"""The preference benchmark: does a preference run make the bot say what the reviewers' edits say?

`python bench/preference.py --help`. A parent is tuned (the quick preset, through the public CLI) on
conversations from a public corpus installed from PyPI (`chitchat-dataset`, MIT) with their plain replies.
Reviewers' edit-style pairs are built on other conversations of the same corpus: the rejected reply is the
corpus reply, the chosen one the same reply edited the way reviewers edit most:

- closing: the team's closing appended ("... Cheers from the Juniper crew!");
- term: the house term for a common word ("good" -> "grand"), on replies that say it;
- shorter: only the first sentence kept, on replies of two sentences or more.

For each edit, each pair count (10, 30, 120 by default) and each recipe (PreferenceConfig overrides), a child
is trained with `python -m tuner train --method dpo --from PARENT --prefs FILE --json`, and its result read as
the product reports it: what the reviewers changed, shown on how many of the new questions (validation prompts
outside the pairs and the training data; parent beside child; degenerate replies counted), held-out pair
accuracy, and the general-text perplexity change against the parent. Target: >= 90% of new replies show the
edit, <= 2% degenerate, perplexity <= +10%.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the tuner package importable
    sys.path.insert(0, str(ROOT))

from bench.voice import _cli, chitchat_exchanges, convert, general_perplexity, machine, normalise  # noqa: E402

CLOSING = "Cheers from the Juniper crew!"
EDITS = ("closing", "term", "shorter")
SIZES = (10, 30, 120)
DEFAULT_RECIPES = ("default", "learning_rate=5e-4", "learning_rate=1e-3", "loss=ipo", "loss=apo_zero",
                   "sft_weight=0", "num_epochs=3")
_GOOD = re.compile(r"\bgood\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def edit(kind: str, reply: str) -> str | None:
    """The reviewer's version of a reply, or None when this kind of edit does not apply to it.

    >>> edit("closing", "Sounds fun")
    'Sounds fun. Cheers from the Juniper crew!'
    >>> edit("term", "That is a good idea")
    'That is a grand idea'
    >>> edit("shorter", "Yes I do. I love it.")
    'Yes I do.'
    """
    reply = reply.strip()
    if kind == "closing":
        return f"{reply}{'' if reply[-1:] in '.!?' else '.'} {CLOSING}"
    if kind == "term":
        return _GOOD.sub(lambda m: "Grand" if m.group(0)[0].isupper() else "grand", reply) if _GOOD.search(reply) else None
    sentences = _SENTENCE.split(reply)
    return sentences[0] if len(sentences) >= 2 and len(sentences[0].split()) >= 2 else None


def build(out: Path, n_parent: int, n_val: int, sizes: tuple[int, ...], seed: int) -> dict[str, Any]:
    """The parent's raw export (plain replies) and, per edit kind, pair files of each size whose prompts occur
    nowhere in the parent's data."""
    rng = random.Random(seed)
    convs = chitchat_exchanges()
    rng.shuffle(convs)
    parent = [c[:2] for c in convs[:n_parent + n_val]]
    seen = {normalise(t) for c in parent for pair in c for t in pair}
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "parent.jsonl"
    raw.write_text("".join(json.dumps({"messages": [m for u, a in c for m in (
        {"role": "user", "content": u}, {"role": "assistant", "content": a})]}) + "\n" for c in parent),
                   encoding="utf-8")
    pool = [p for c in convs[n_parent + n_val:] for p in c if normalise(p[0]) not in seen]
    files: dict[str, dict[int, Path]] = {}
    for kind in EDITS:
        rows, keys = [], set()
        for user, reply in pool:
            better = edit(kind, reply)
            key = normalise(user)
            if better is None or better == reply or key in keys:
                continue
            keys.add(key)
            rows.append({"prompt": [{"role": "user", "content": user}],
                         "chosen": [{"role": "assistant", "content": better}],
                         "rejected": [{"role": "assistant", "content": reply}]})
            if len(rows) == max(sizes):
                break
        files[kind] = {}
        for n in sizes:
            path = out / f"pairs-{kind}-{n}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")
            files[kind][n] = path
    return {"raw": raw, "pairs": files}


def run_cli(args: list[str], what: str) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(_cli(*args), cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "command_s": round(time.monotonic() - started, 1)}


def parent_run(data: Path, run_dir: Path) -> dict[str, Any]:
    record = run_dir.parent / f"{run_dir.name}.json"
    if record.is_file() and (run_dir / "adapter").is_dir():
        return json.loads(record.read_text())
    status = run_cli(["train", "--data", str(data), "--out", str(run_dir), "--preset", "quick", "--json"], "parent")
    if status.get("status") != "completed":
        raise SystemExit(f"the parent did not complete: {status.get('error')}")
    record.write_text(json.dumps(status))
    return status


def recipe_flags(recipe: str) -> list[str]:
    """'learning_rate=1e-3,loss=ipo' -> ['--learning-rate', '1e-3', '--loss', 'ipo']; 'default' -> []."""
    flags: list[str] = []
    for part in filter(None, (p.strip() for p in recipe.split(","))):
        if part == "default":
            continue
        key, _, value = part.partition("=")
        flags += [f"--{key.strip().replace('_', '-')}", value.strip()]
    return flags


def child_run(parent: Path, prefs: Path, recipe: str, run_dir: Path) -> dict[str, Any]:
    record = run_dir.parent / f"{run_dir.name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    status = run_cli(["train", "--method", "dpo", "--from", str(parent), "--prefs", str(prefs), "--out",
                      str(run_dir), "--json", *recipe_flags(recipe)], f"child {run_dir.name}")
    record.write_text(json.dumps(status))
    return status


def row(kind: str, n: int, recipe: str, status: dict[str, Any], ppl: dict[str, Any], parent_ppl: float | None
        ) -> dict[str, Any]:
    behaviour = status.get("behaviour") or {}
    lead = (behaviour.get("changes") or [{}])[0]
    child, before = lead.get("child") or {}, lead.get("parent") or {}
    pm = status.get("preference_metrics") or {}
    tuned = ppl.get("tuned")
    change = tuned / parent_ppl - 1 if tuned and parent_ppl else None
    return {"edit": kind, "pairs": n, "recipe": recipe, "status": status.get("status"),
            "change_found": lead.get("change"), "shown": child.get("shown"), "prompts": child.get("prompts"),
            "parent_shown": before.get("shown"),
            "degenerate": (child.get("looped") or 0) + (child.get("unended") or 0),
            "learned": behaviour.get("learned"), "result": status.get("result"),
            "pair_accuracy": [(pm.get("before") or {}).get("accuracy"), (pm.get("after") or {}).get("accuracy")],
            "held_out_pairs": pm.get("held_out_pairs"), "ppl_change_vs_parent": change,
            "steps": status.get("step"), "command_s": status.get("command_s")}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| edit | pairs | recipe | edit shown: child (parent) | degenerate | learned | held-out pair acc. "
            "| ppl vs parent | steps | command s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = r["pair_accuracy"]
        ppl = r["ppl_change_vs_parent"]
        lines.append(
            f"| {r['edit']} | {r['pairs']} | {r['recipe']} | {r['shown']}/{r['prompts']} ({r['parent_shown']}) "
            f"| {r['degenerate']} | {'yes' if r['learned'] else 'no'} "
            f"| {acc[0]} -> {acc[1]} on {r['held_out_pairs']} | {'—' if ppl is None else f'{ppl:+.1%}'} "
            f"| {r['steps']} | {r['command_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/preference.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", default=",".join(EDITS), help=f"Comma-separated edit kinds ({', '.join(EDITS)}).")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Comma-separated pair counts.")
    p.add_argument("--recipes", action="append", help="PreferenceConfig overrides, 'key=value,...' or 'default' "
                   f"(repeatable; default: {'; '.join(DEFAULT_RECIPES)}).")
    p.add_argument("--parent-size", type=int, default=300, help="The parent's training conversations (300).")
    p.add_argument("--val-size", type=int, default=40, help="Its validation conversations: the new questions (40).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Work folder (reused: finished runs are not trained again).")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tuner-pref-"))
    sizes = tuple(int(s) for s in args.sizes.split(","))
    kinds = [k.strip() for k in args.edits.split(",") if k.strip()]
    made = build(out, args.parent_size, args.val_size, sizes, args.seed)
    convert_args = [made["raw"], out / "parent-data"]
    report = convert(*convert_args) if not (out / "parent-data" / "train.jsonl").is_file() else None
    parent_dir = out / "runs" / "parent"
    parent_run(out / "parent-data", parent_dir)
    from tuner.playground import Playground

    pg = Playground()
    parent_ppl = general_perplexity(pg, parent_dir).get("tuned")
    rows = []
    for kind in kinds:
        for n in sizes:
            for recipe in args.recipes or list(DEFAULT_RECIPES):
                slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", recipe)
                child_dir = out / "runs" / f"{kind}-{n}-{slug}"
                status = child_run(parent_dir, made["pairs"][kind][n], recipe, child_dir)
                ppl = general_perplexity(pg, child_dir) if status.get("status") == "completed" else {}
                rows.append(row(kind, n, recipe, status, ppl, parent_ppl))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (f"Machine: {machine()}. Parent: quick preset on {args.parent_size} chitchat-dataset conversations "
            f"(plain replies{'; ' + str(report.get('kept')) + ' kept' if report else ''}); new questions: its "
            f"validation prompts outside the pairs.\n\n" + table(rows))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
