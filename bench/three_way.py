"""Tune, prompt or retrieve? The three ways of `tuner eval` on public corpora, with the machine beside the figures.

`python bench/three_way.py --help`. For each brand set of bench/voice.py (public dialog corpora
shipped on PyPI, one injected habit) it converts and trains through the public CLI (a finished run
in the work folder is reused), then runs `tuner.evaluate.evaluate` on held-out prompts that occur
nowhere in the training data, with the corpus's own reply (habit injected) as the reference:

- prompting: the base model told the brand brief,
- retrieval: the same, shown the k training conversations most like the question (tuner.retrieve, BM25),
- tuning: the tuned model,

and prints each way's habit count, chrF against the references, degenerate replies, median
reply length, prompt tokens and seconds per reply, the sentence on which to ship, and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the tuner and bench packages importable
    sys.path.insert(0, str(ROOT))

from bench.voice import SETS, _slug, build_set, convert, parse_recipe, trained, write_set  # noqa: E402

WAYS = (("base", "prompting (base + brand brief)"), ("retrieved", "retrieval (base + brief + k examples)"),
        ("tuned", "tuning"))


def machine() -> dict[str, Any]:
    """The CPU model, its cores and the flags that matter (tuner.precision), the GPU if any, torch's version."""
    import torch

    from tuner.precision import cpu_info

    cpu = cpu_info()
    return {"cpu": cpu["model"], "cores": cpu["cores"], "flags": cpu["flags"],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, flags: {' '.join(m['flags']) or 'none of interest'}"
            + (f"; GPU {m['gpu']}" if m["gpu"] else "; no GPU") + f"; torch {m['torch']}")


def _count(value: dict[str, int] | None) -> str:
    return f"{value['count']}/{value['of']}" if value else "—"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per brand set x recipe x way, then the agents' own replies; the sentence under it."""
    head = ("| set | recipe | way | habit exact | chrF vs agents | degenerate | words (median) | prompt tokens "
            "| s / reply |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        m = r["metrics"]
        for col, label in WAYS:
            lines.append(f"| {r['set']} | {r['recipe']} | {label} | {_count(m['habit'].get(col))} "
                         f"| {m['chrf'].get(col)} | {m['degenerate'].get(col)} | {m['length_words'][col]['median']:g} "
                         f"| {m['prompt_tokens'].get(col)} | {m['seconds_per_reply'].get(col)} |")
        ref = m["length_words"].get("reference") or {}
        lines.append(f"| {r['set']} | {r['recipe']} | the agents' replies | {_count(m['habit'].get('reference'))} "
                     f"| 100 | — | {ref.get('median', '—')} | — | — |")
    for r in results:
        lines += ["", f"**{r['set']} / {r['recipe']}:** {r['sentence']}. (k={r['k']}, retrieval adds "
                      f"{r['added_prompt_tokens']} prompt tokens a reply; {r['prompts']} held-out prompts; "
                      f"train {r['train_wall_s']} s, evaluation {r['eval_wall_s']} s.)"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/three_way.py",
        description="Prompting vs retrieval vs tuning on public corpora from PyPI (chitchat-dataset, "
                    "chatterbot-corpus) with an injected habit: train (or reuse a run in --out), evaluate the three "
                    "ways on held-out prompts with the corpus replies as references. Nothing is downloaded.")
    p.add_argument("--sets", default="signoff-en", help=f"Comma-separated brand sets of bench/voice.py ({', '.join(SETS)}).")
    p.add_argument("--recipe", default="default", help="The training recipe (bench/voice.py's syntax; default: "
                   "`train` without a preset).")
    p.add_argument("--train-size", type=int, default=400, help="Conversations per brand set (default 400).")
    p.add_argument("--prompts", type=int, default=24, help="Held-out prompts per set (default 24).")
    p.add_argument("--k", type=int, default=3, help="Training conversations shown to retrieval per question (default 3).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Longest reply (default: the playground's).")
    p.add_argument("--max-steps", type=int, default=None, help="Cap the training at N steps (smoke runs).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data sampling.")
    p.add_argument("--out", default=None, help="Work folder (default: a fresh one under the temp folder); a "
                   "finished run there is reused.")
    p.add_argument("--json", action="store_true", help="Print the results as JSON instead of the table.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tuner.config import GenerationConfig
    from tuner.evaluate import evaluate
    from tuner.playground import Playground

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for name in sets:
        if name not in SETS:
            raise SystemExit(f"Unknown brand set '{name}'. Choose from: {', '.join(SETS)}.")
    recipe = parse_recipe(args.recipe)
    settings = GenerationConfig(max_new_tokens=args.max_new_tokens or GenerationConfig().max_new_tokens)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tuner-three-way-"))
    out.mkdir(parents=True, exist_ok=True)
    pg = Playground()
    results = []
    for name in sets:
        bs = build_set(name, args.train_size, args.prompts, args.seed)
        raw = write_set(bs, out / name)
        prompts_file = out / name / "heldout-with-references.json"
        prompts_file.write_text(json.dumps([{"prompt": p, "reference": r} for p, r in zip(bs.heldout, bs.references,
                                                                                       strict=True)],
                                           ensure_ascii=False, indent=1), encoding="utf-8")
        data = out / name / "data"
        if not (data / "train.jsonl").is_file():
            convert(raw, data)
        run_dir = out / "runs" / (f"{name}-{_slug(recipe.label)}" + (f"-{args.max_steps}" if args.max_steps else ""))
        status = trained(data, recipe, run_dir, args.max_steps)
        started = time.monotonic()
        result = evaluate(run_dir, prompts_file, settings, limit=None, playground=pg, k=args.k)
        three = result["three_way"]
        results.append({"set": name, "recipe": recipe.label, "prompts": len(result["rows"]), "k": three["k"],
                        "sentence": three["sentence"], "added_prompt_tokens": three["added_prompt_tokens"],
                        "metrics": {key: result["metrics"][key] for key in
                                    ("habit", "chrf", "degenerate", "length_words", "prompt_tokens",
                                     "seconds_per_reply", "brand_phrase_rate")},
                        "train_wall_s": status.get("train_wall_s"), "steps": status.get("step"),
                        "eval_wall_s": round(time.monotonic() - started, 1), "settings": result["settings"],
                        "rows": result["rows"]})
        print(f"[three-way] {name} | {recipe.label}: {three['sentence']}", file=sys.stderr, flush=True)
    summary = {"machine": machine(), "command": "python bench/three_way.py " + " ".join(argv or sys.argv[1:]),
               "results": results}
    (out / "three_way.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    md = f"Machine: {machine_line(summary['machine'])}\n\n" + table(results)
    (out / "three_way.md").write_text(md, encoding="utf-8")
    print(json.dumps(summary, ensure_ascii=False) if args.json else md)
    print(f"[three-way] results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
