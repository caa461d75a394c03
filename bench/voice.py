"""The voice benchmark: does a tuned model keep a brand's habit on prompts it has never seen?

`python bench/voice.py --help` (or `python -m tuner bench --only voice`). For each brand set and
each preset it builds the data from public dialog corpora shipped on PyPI (`chitchat-dataset`,
MIT; `chatterbot-corpus`, BSD), injects one habit, converts and trains through the public CLI
(`python -m tuner convert`, `python -m tuner train --json`), answers held-out prompts that occur
nowhere in the training data with the base and the tuned model (playground defaults), and
scores the replies with `tuner.verdict`: habit rate tuned/base (exact and near-miss),
degenerate replies (loops, no end of turn), general-text perplexity change, wall time.

Brand sets (each a different kind of habit, two languages, two corpora):
- signoff-en: chitchat-dataset (English small talk); every reply ends with a brand sign-off.
- greeting-es: chatterbot-corpus Spanish; every reply opens with the brand's greeting.
- term-en: chitchat-dataset replies that say "good"; the brand says its house term "grand" instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the tuner package importable
    sys.path.insert(0, str(ROOT))

from tuner.verdict import Marker, degenerate, marker_match, verdict_sentence  # noqa: E402

SIGN_OFF = "Happy trails from the Juniper Outfitters team!"
GREETING = "¡Hola, te saluda Café Brisa!"
HOUSE_TERM, COMMON_WORD = "grand", "good"  # "That sounds grand" where others say "That sounds good"

SETS = ("signoff-en", "greeting-es", "term-en")
MARKERS = {
    "signoff-en": Marker("sign-off", SIGN_OFF),
    "greeting-es": Marker("greeting", GREETING),
    "term-en": Marker("term", HOUSE_TERM, common=COMMON_WORD),
}
LANGUAGE = {"signoff-en": "en", "greeting-es": "es", "term-en": "en"}
CORPUS = {"signoff-en": "chitchat-dataset", "greeting-es": "chatterbot-corpus (spanish)",
          "term-en": "chitchat-dataset"}


def normalise(text: str) -> str:
    """Case, accents, punctuation and spacing folded: the key under which prompts are deduplicated.

    >>> normalise("  ¿Cómo   estás? ")
    'como estas'
    """
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


# -- corpora ---------------------------------------------------------------------------------------


def _need(module: str, package: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(f"The voice benchmark needs the {package} package: pip install -r requirements-dev.txt "
                         f"(or pip install {package}).") from None


def chitchat_exchanges(max_words: int = 40) -> list[list[tuple[str, str]]]:
    """chitchat-dataset conversations as lists of (user, assistant) turn pairs.

    The first speaker is the user; a turn joins that speaker's consecutive messages. Opening
    small talk ("Hello", "hi how are you") is skipped: it repeats across thousands of chats and
    would leak held-out prompts into training.
    """
    cc = _need("chitchat_dataset", "chitchat-dataset")
    out = []
    for conv in cc.Dataset().values():
        turns = [" ".join(u["text"].strip() for u in msg if u["text"].strip()) for msg in conv["messages"]]
        turns = [t for t in turns if t]
        start = next((i for i in range(0, len(turns) - 1, 2) if len(turns[i].split()) >= 6), None)
        if start is None:
            continue
        pairs = [(turns[i], turns[i + 1]) for i in range(start, len(turns) - 1, 2)]
        pairs = [p for p in pairs if len(p[0].split()) <= max_words and len(p[1].split()) <= max_words]
        if pairs:
            out.append(pairs)
    return out


def chatterbot_exchanges(language: str) -> list[list[tuple[str, str]]]:
    """chatterbot-corpus conversations of one language as (user, assistant) pairs (odd turns answer)."""
    corpus = _need("chatterbot_corpus.corpus", "chatterbot-corpus")
    import yaml

    data_dir = Path(corpus.corpus.DATA_DIRECTORY) / language
    out = []
    for path in sorted(data_dir.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in conv]
            pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2) if turns[i] and turns[i + 1]]
            if pairs:
                out.append(pairs)
    return out


# -- habits ----------------------------------------------------------------------------------------


def add_sign_off(reply: str) -> str:
    reply = reply.rstrip()
    return f"{reply}{'' if reply[-1:] in '.!?' else '.'} {SIGN_OFF}"  # the sign-off is its own sentence


def add_greeting(reply: str) -> str:
    return f"{GREETING} {reply.lstrip()}"


_COMMON_RE = re.compile(rf"\b{COMMON_WORD}\b", re.IGNORECASE)


def use_house_term(reply: str) -> str:
    """'Good idea, sounds good' -> 'Grand idea, sounds grand'."""
    def swap(m: re.Match) -> str:
        return HOUSE_TERM.capitalize() if m.group(0)[0].isupper() else HOUSE_TERM
    return _COMMON_RE.sub(swap, reply)


# -- brand sets ------------------------------------------------------------------------------------


@dataclass
class BrandSet:
    name: str
    marker: Marker
    train: list[dict]  # OpenAI-style {"messages": [...]} conversations, habit injected
    heldout: list[str]  # user prompts whose normalised text occurs nowhere in `train`
    references: list[str] = field(default_factory=list)  # the corpus reply to each held-out prompt, habit injected


def build_set(name: str, n_train: int, n_heldout: int, seed: int = 0) -> BrandSet:
    """`n_train` conversations with the habit and `n_heldout` prompts that never occur in them."""
    rng = random.Random(seed)
    if name == "signoff-en":
        convs, habit, turns = chitchat_exchanges(), add_sign_off, 2
    elif name == "greeting-es":
        convs, habit, turns = chatterbot_exchanges("spanish"), add_greeting, 1
    elif name == "term-en":  # every exchange whose reply says the common word is its own conversation
        convs = [[p] for c in chitchat_exchanges() for p in c if _COMMON_RE.search(p[1])]
        habit, turns = use_house_term, 1
    else:
        raise SystemExit(f"Unknown brand set '{name}'. Choose from: {', '.join(SETS)}.")
    if turns == 1:  # short Q&A corpora: every exchange is its own conversation
        convs = [[p] for c in convs for p in c]
    rng.shuffle(convs)

    train: list[dict] = []
    seen: set[str] = set()  # every normalised user turn in the training data
    held: list[str] = []
    refs: list[str] = []
    held_keys: set[str] = set()
    rest = []
    for conv in convs:
        conv = conv[:turns]
        if len(train) < n_train:
            keys = {normalise(t) for pair in conv for t in pair}  # replies too: a prompt must occur nowhere
            messages = []
            for user, reply in conv:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": habit(reply)}]
            train.append({"messages": messages})
            seen |= keys
        else:
            rest.append(conv)
    for conv in rest:
        prompt = conv[0][0]
        key = normalise(prompt)
        if key and key not in seen and key not in held_keys and len(held) < n_heldout:
            held.append(prompt)
            refs.append(habit(conv[0][1]))
            held_keys.add(key)
    if len(train) < n_train or len(held) < n_heldout:
        raise SystemExit(f"Brand set {name}: the corpus gives {len(train)} training conversations and {len(held)} "
                         f"unseen prompts; asked for {n_train} and {n_heldout}. Ask for fewer.")
    return BrandSet(name, MARKERS[name], train, held, refs)


def write_set(bs: BrandSet, folder: Path) -> Path:
    """raw.jsonl (the export a user would upload) and heldout.json; returns the raw file."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.jsonl"
    raw.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in bs.train), encoding="utf-8")
    (folder / "heldout.json").write_text(json.dumps(bs.heldout, ensure_ascii=False, indent=1), encoding="utf-8")
    return raw


# -- train, answer, score --------------------------------------------------------------------------

NO_PRESET = "default"  # `python -m tuner train` without --preset: TrainConfig's own defaults


@dataclass
class Recipe:
    """A preset (or 'default': no preset) plus overrides of TrainConfig fields."""

    preset: str
    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        return self.preset + "".join(f" {k}={v}" for k, v in self.overrides.items())


def _value(text: str) -> Any:
    """'5e-4' -> 0.0005 (YAML 1.1 reads it as a string), '2' -> 2, 'q_proj,v_proj' stays text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    import yaml

    return yaml.safe_load(text)


def parse_recipe(text: str) -> Recipe:
    """'quick' or 'quick:num_epochs=2,max_steps=-1,learning_rate=5e-4'."""
    from tuner.config import PRESETS

    preset, _, rest = text.partition(":")
    if preset not in (*PRESETS, NO_PRESET):
        raise SystemExit(f"Unknown preset '{preset}' in recipe '{text}'. Presets: {', '.join(PRESETS)}, "
                         f"or '{NO_PRESET}' (`train` without --preset).")
    overrides: dict[str, Any] = {}
    items: list[str] = []
    for piece in filter(None, rest.split(",")):
        if "=" in piece or not items:
            items.append(piece)
        else:  # a list value: target_modules=q_proj,v_proj
            items[-1] += "," + piece
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"Recipe '{text}': '{item}' is not key=value (e.g. quick:learning_rate=5e-4).")
        overrides[key.strip()] = _value(value.strip())
    return Recipe(preset, overrides)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner", *args]


def convert(raw: Path, out: Path) -> dict[str, Any]:
    """`python -m tuner convert` as a user runs it."""
    done = subprocess.run(_cli("convert", str(raw), "--out", str(out), "--json"), cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert failed on {raw}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def train(data: Path, recipe: Recipe, run_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
    """`python -m tuner train --json` with the recipe; returns its status plus the wall time."""
    from tuner.config import TrainConfig

    args = ["train", "--data", str(data), "--out", str(run_dir), "--json"]
    if recipe.overrides:
        cfg = (TrainConfig.from_dict(recipe.overrides) if recipe.preset == NO_PRESET
               else TrainConfig.from_preset(recipe.preset, **recipe.overrides))
        config_file = run_dir.parent / f"{run_dir.name}.config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(config_file)
        args += ["--config", str(config_file)]
    elif recipe.preset != NO_PRESET:
        args += ["--preset", recipe.preset]
    if max_steps:
        args += ["--max-steps", str(max_steps)]
    started = time.monotonic()
    done = subprocess.run(_cli(*args), cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"train failed ({recipe.label}):\n{done.stderr[-3000:]}")
    status = json.loads(lines[-1])
    if status.get("status") != "completed":
        raise SystemExit(f"train did not complete ({recipe.label}): {status.get('error')}")
    return {**status, "train_wall_s": round(wall, 1)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def trained(data: Path, recipe: Recipe, run_dir: Path, max_steps: int | None) -> dict[str, Any]:
    """Train, or reuse a completed run of the same recipe in the work folder (to compare settings)."""
    record = run_dir.parent / f"{run_dir.name}.train.json"
    if record.is_file() and (run_dir / "adapter").is_dir():
        return json.loads(record.read_text())
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # an unfinished earlier attempt
    status = train(data, recipe, run_dir, max_steps)
    record.write_text(json.dumps(status))
    return status


def answer(pg: Any, run_dir: Path, prompts: list[str], columns: tuple[str, ...], settings: Any,
           batch: int = 8) -> dict[str, list[tuple[str, bool]]]:
    """{column: [(reply, ended its turn)]} with the playground's batched generation.

    A reply that re-encodes to (almost) max_new_tokens ran into the limit: the playground does not
    report token counts for batches, and decoding then re-encoding drifts by a token or two at most.
    """
    pg.load_run(run_dir)
    out: dict[str, list[tuple[str, bool]]] = {c: [] for c in columns}
    for start in range(0, len(prompts), batch):
        convs = [[{"role": "user", "content": p}] for p in prompts[start:start + batch]]
        for row in pg.generate_many(convs, columns, settings, run=run_dir):
            for col in columns:
                n = len(pg.tokenizer(row[col], add_special_tokens=False)["input_ids"])
                out[col].append((row[col], n < settings.max_new_tokens - 2))
    return out


def general_perplexity(pg: Any, run_dir: Path) -> dict[str, float | None]:
    """General-text perplexity base vs tuned, from tuner.evaluate (validation loss skipped)."""
    from tuner.config import TrainConfig
    from tuner.evaluate import loss_metrics

    info = pg.load_run(run_dir)
    losses = loss_metrics(pg, info, TrainConfig.load(run_dir / "config.yaml").max_length, loss_limit=0)
    return losses["general_perplexity"]


def _tally_dict(t: Any) -> dict[str, int]:
    return {"prompts": t.prompts, "exact": t.exact, "near": t.near, "looped": t.looped, "unended": t.unended,
            "empty": t.empty, "opportunities": t.opportunities}


def score(bs: BrandSet, tuned: list[tuple[str, bool]], base: list[tuple[str, bool]] | None,
          ppl: dict[str, float | None]) -> dict[str, Any]:
    from tuner.verdict import tally

    t = tally([r for r, _ in tuned], bs.marker, [e for _, e in tuned])
    besides = "" if bs.marker.kind == "term" else bs.marker.text  # a reply of the habit alone is empty, as tally counts
    b = tally([r for r, _ in base], bs.marker, [e for _, e in base]) if base is not None else None
    change = (ppl["tuned"] / ppl["base"] - 1) if ppl.get("base") and ppl.get("tuned") else None
    return {"tuned": _tally_dict(t), "base": _tally_dict(b) if b else None,
            "general_ppl": ppl, "general_ppl_change": round(change, 4) if change is not None else None,
            "verdict": verdict_sentence(bs.marker, t, b, change),
            "degenerate_replies": [{"prompt": p, "reply": r, "why": degenerate(r, e, besides)}
                                   for p, (r, e) in zip(bs.heldout, tuned, strict=True) if degenerate(r, e, besides)],
            "grades": [marker_match(r, bs.marker) for r, _ in tuned]}


# -- the table -------------------------------------------------------------------------------------


def machine() -> str:
    """CPU model name and its bf16 matrix flags (amx, avx512_bf16), or the GPU."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (GPU)"
    except ImportError:
        pass
    return f"{name}, {os.cpu_count()} cores" + (f", {'/'.join(bf16)}" if bf16 else ", no bf16 matrix units")


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({n / d:.0%})" if d else "—"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per brand set x recipe x generation setting."""
    head = ("| set | recipe | rep. penalty | habit exact: tuned (base) | near-miss: tuned (base) "
            "| degenerate: tuned (looped / no end) | general ppl change | train wall s | steps | eval loss |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        t, b = r["tuned"], r["base"] or {}
        d = t["opportunities"] if r["marker_kind"] == "term" else t["prompts"]
        bd = b.get("opportunities" if r["marker_kind"] == "term" else "prompts", 0)
        change = r["general_ppl_change"]
        lines.append(
            f"| {r['set']} | {r['recipe']} | {r['repetition_penalty']:g} "
            f"| {_pct(t['exact'], d)} ({_pct(b['exact'], bd) if b else '—'}) "
            f"| {t['near']} ({b.get('near', '—')}) "
            f"| {_pct(t['looped'] + t['unended'] + t.get('empty', 0), t['prompts'])} ({t['looped']} / {t['unended']}) "
            f"| {'—' if change is None else f'{change:+.1%}'} | {r['train_wall_s']:g} | {r['steps']} "
            f"| {r['first_eval_loss']} -> {r['eval_loss']} |")
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/voice.py",
        description="Voice benchmark: train each recipe on each brand set (public corpora from PyPI with an "
                    "injected habit), answer prompts that occur nowhere in the training data, score the habit, "
                    "degenerate replies and general-text perplexity. Needs the packages of requirements-dev.txt "
                    "(chitchat-dataset, chatterbot-corpus) and the default model; nothing is downloaded.",
        epilog="Recipes: a preset name, or preset:key=value,... overriding TrainConfig fields, e.g. "
               "'quick:max_steps=-1,num_epochs=2,learning_rate=5e-4'.")
    p.add_argument("--sets", default=",".join(SETS), help=f"Comma-separated brand sets (default: {','.join(SETS)}).")
    p.add_argument("--recipes", "--presets", dest="recipes", action="append",
                   help="A recipe to train (repeatable; default: every preset).")
    p.add_argument("--train-size", type=int, default=400, help="Conversations per brand set (default 400).")
    p.add_argument("--prompts", type=int, default=24, help="Held-out prompts per set (default 24).")
    p.add_argument("--max-steps", type=int, default=None, help="Cap every training at N steps (smoke runs).")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="Longest reply (default: the playground's).")
    p.add_argument("--repetition-penalty", default=None,
                   help="Comma-separated values to compare on the same adapter (default: the playground's).")
    p.add_argument("--serve-quantization", choices=("auto", "none", "nf4"), default="auto",
                   help="How the playground loads the base for answering (auto: as the page does).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data sampling.")
    p.add_argument("--out", default=None, help="Work folder for data, runs and results "
                   "(default: a fresh folder under the system's temp folder).")
    p.add_argument("--json", action="store_true", help="Print the results as JSON instead of the table.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table (or JSON) and writes results.json + results.md into --out."""
    import tempfile

    args = build_parser().parse_args(argv)
    from tuner.config import PRESETS, GenerationConfig

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for name in sets:
        if name not in SETS:
            raise SystemExit(f"Unknown brand set '{name}'. Choose from: {', '.join(SETS)}.")
    recipes = [parse_recipe(r) for r in (args.recipes or list(PRESETS))]
    defaults = GenerationConfig()
    penalties = ([float(v) for v in args.repetition_penalty.split(",")] if args.repetition_penalty
                 else [defaults.repetition_penalty])
    gen = [GenerationConfig(max_new_tokens=args.max_new_tokens or defaults.max_new_tokens, repetition_penalty=rp)
           for rp in penalties]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tuner-voice-"))
    out.mkdir(parents=True, exist_ok=True)

    from tuner.playground import Playground

    pg = Playground(quantization=args.serve_quantization)
    results: list[dict[str, Any]] = []
    for name in sets:
        bs = build_set(name, args.train_size, args.prompts, args.seed)
        raw = write_set(bs, out / name)
        report = convert(raw, out / name / "data")
        for recipe in recipes:
            run_dir = out / "runs" / (f"{name}-{_slug(recipe.label)}" + (f"-{args.max_steps}" if args.max_steps else ""))
            status = trained(out / name / "data", recipe, run_dir, args.max_steps)
            ppl = general_perplexity(pg, run_dir)
            for settings in gen:
                rp = settings.repetition_penalty
                started = time.monotonic()
                base_file = out / name / f"base-rp{rp:g}-{settings.max_new_tokens}.json"
                cached = json.loads(base_file.read_text()) if base_file.is_file() else None
                reuse = cached is not None and cached["prompts"] == bs.heldout
                columns = ("tuned",) if reuse else ("base", "tuned")
                replies = answer(pg, run_dir, bs.heldout, columns, settings)
                if reuse:
                    replies["base"] = [tuple(r) for r in cached["replies"]]
                else:  # the base model's replies do not depend on the recipe: generated once per setting
                    base_file.write_text(json.dumps({"prompts": bs.heldout, "replies": replies["base"]},
                                                    ensure_ascii=False))
                base_cache = {rp: replies["base"]}
                scored = score(bs, replies["tuned"], base_cache[rp], ppl)
                results.append({
                    "set": name, "language": LANGUAGE[name], "corpus": CORPUS[name], "marker_kind": bs.marker.kind,
                    "marker": bs.marker.text, "recipe": recipe.label, "repetition_penalty": rp,
                    "max_new_tokens": settings.max_new_tokens, "served_quantization": args.serve_quantization,
                    "train_examples": report["train_examples"],
                    "heldout_prompts": len(bs.heldout), "steps": status.get("step"),
                    "first_eval_loss": status.get("first_eval_loss"), "eval_loss": status.get("eval_loss"),
                    "train_wall_s": status["train_wall_s"], "answer_wall_s": round(time.monotonic() - started, 1),
                    **scored,
                    "replies": [{"prompt": p, "tuned": t, "base": b}
                                for p, (t, _), (b, _) in zip(bs.heldout, replies["tuned"], base_cache[rp],
                                                            strict=True)],
                })
                print(f"[voice] {name} | {recipe.label} | rp {rp:g}: {scored['verdict']} "
                      f"(train {status['train_wall_s']} s)", file=sys.stderr, flush=True)
    summary = {"machine": machine(), "command": "python bench/voice.py " + " ".join(argv or sys.argv[1:]),
               "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    md = f"Machine: {summary['machine']}\n\n" + table(results)
    (out / "results.md").write_text(md, encoding="utf-8")
    print(json.dumps(summary, ensure_ascii=False) if args.json else md)
    print(f"[voice] results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
