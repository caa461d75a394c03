"""The preference benchmark: does a preference run make the bot say what the reviewers' edits say?

`python bench/preference.py --help`. A parent is tuned (the quick preset, through the public CLI) on
conversations from a public corpus installed from PyPI (`chitchat-dataset`, MIT) with their plain replies.
Reviewers' edit-style pairs are built on other conversations of the same corpus: the rejected reply is the
corpus reply, the chosen one the same reply edited the way reviewers edit most:

- closing: the team's closing appended ("... Cheers from the Juniper crew!");
- term: the house term for a common word ("good" -> "grand"), on replies that say it;
- spelled: the house style that spells out "I'm" ("I am"), on replies that say it: a word the bot's own replies
  say (15 of the parent's 24 replies to the new questions), where the parent never says "good";
- shorter: only the first sentence kept, on replies of two sentences or more.

With `--pairs-from parent` the rejected reply is instead the parent bot's own greedy reply to the question (what a
reviewer edits in the product), and the chosen one that reply edited.

For each edit, each pair count (10, 30, 120 by default) and each recipe (a named loss, a beta, a learning rate:
PreferenceConfig overrides), a child is trained with `python -m tuner train --method dpo|kto --from PARENT
--prefs FILE --json`, and its result read as the product reports it: what the reviewers changed, shown on how
many of the new questions (validation prompts outside the pairs and the training data; parent beside child;
degenerate replies counted), held-out pair accuracy, and the general-text perplexity change against the parent.
Besides, the parent's voice: the perplexity of the parent's own words on the new questions (its replies with the
edit applied, teacher-forced) under the child against under the parent (parent_words), and, shown but no target,
how close the child's greedy replies stay to the parent's with the edit (word similarity): greedy text changes with
any arithmetic, and the same parent decoded in fp32 instead of bf16 is ~0.6 similar to itself (greedy_floor, in
the table's heading).

Targets (a row says PASS only when it meets all five, MISS with what it missed otherwise): the edit on >= 90% of
the new replies it applies to, <= 2% degenerate, fewer than half the new replies the same as another question's
where the parent's were not (stock replies, as the product says), general-text perplexity <= +10% against the
parent, and the parent's voice kept (its own words at most +10% perplexity under the child).

`--more-questions N` asks parent and each child N more new questions (user turns of the corpus from conversations
the parent never saw, outside every pair) and counts the edit and the degenerate replies on them as the product
counts them: 24 questions cannot tell 0 degenerate replies from 1 or 2, and the target is 0 of 24. With it, for a
replaced word, the parent itself is made to say the new word where its reply said the old one and left to go on
(made_to_say: what a child held to the parent after the new word starts from); `--edited-parent KIND` also tunes a
parent on its conversations with the edit applied to every reply (edited_parent).

The parent and every finished child are cached in --out (default /tmp/prefbench): a second command with a
bigger grid trains only what is missing, and `--report` prints the table of everything cached so far.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import statistics
import subprocess
import sys
import time
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the tuner package importable
    sys.path.insert(0, str(ROOT))

from bench.voice import _cli, chitchat_exchanges, convert, general_perplexity, machine, normalise  # noqa: E402
from tuner.edits import STOCK_SHARE  # noqa: E402  (half the new replies the same as another question's: a miss)

CLOSING = "Cheers from the Juniper crew!"
EDITS = ("closing", "term", "spelled", "shorter")
SIZES = (10, 30, 120)
DEFAULT_RECIPES = ("default", "ipo+sft", "apo_zero+sft", "sigmoid", "kto")
LEARNED, DEGENERATE, PPL_MAX, VOICE_PPL_MAX = 0.9, 0.02, 0.10, 0.10  # the targets (issue 24)
_GOOD = re.compile(r"\bgood\b", re.IGNORECASE)
_IM = re.compile(r"\bI'm\b")
WORD = {"term": _GOOD, "spelled": _IM}  # the word each replacement edit replaces, and the words it says instead
NEW = {"term": r"\bgrand\b", "spelled": r"\bI am\b"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def edit(kind: str, reply: str) -> str | None:
    """The reviewer's version of a reply, or None when this kind of edit does not apply to it.

    >>> edit("closing", "Sounds fun")
    'Sounds fun. Cheers from the Juniper crew!'
    >>> edit("term", "That is a good idea")
    'That is a grand idea'
    >>> edit("spelled", "I'm glad I'm here")
    'I am glad I am here'
    >>> edit("shorter", "Yes I do. I love it.")
    'Yes I do.'
    """
    reply = reply.strip()
    if kind == "closing":
        return f"{reply}{'' if reply[-1:] in '.!?' else '.'} {CLOSING}"
    if kind == "term":
        return _GOOD.sub(lambda m: "Grand" if m.group(0)[0].isupper() else "grand", reply) if _GOOD.search(reply) else None
    if kind == "spelled":
        return _IM.sub("I am", reply) if _IM.search(reply) else None
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
    return {"raw": raw, "pairs": files, "pool": pool}


def parent_pairs(out: Path, pg, parent_dir: Path, sizes: tuple[int, ...], seed: int, kinds: list[str],
                 pool: list[tuple[str, str]]) -> dict[str, dict[int, Path]]:
    """Pairs as the product makes them from reviewers' edits: the rejected reply is the parent bot's own (greedy,
    as the playground serves it) to a question outside its data, the chosen one that reply edited. Kept in
    `out`; a kind for which the parent's replies rarely qualify (the house term) stops after 8x the pairs asked."""
    from tuner.config import GenerationConfig
    from tuner.playground import TUNED

    files: dict[str, dict[int, Path]] = {}
    settings = GenerationConfig(temperature=0.0, max_new_tokens=96)
    replies: dict[str, tuple[str, bool]] = {}
    cache = out / "parent-replies.json"
    if cache.is_file():
        replies = {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
    for kind in kinds:
        paths = {n: out / f"pairs-parent-{kind}-{n}.jsonl" for n in sizes}
        if all(p.is_file() for p in paths.values()):
            files[kind] = paths
            continue
        rows, tried = [], 0
        for start in range(0, 8 * max(sizes), 16):
            batch = [u for u, _ in pool[start:start + 16]]
            todo = [u for u in batch if u not in replies]
            if todo:
                pg.load_run(parent_dir)
                got, ended = pg.answers([[{"role": "user", "content": u}] for u in todo], [TUNED], settings,
                                        run=parent_dir)[TUNED]
                replies.update({u: (r, e) for u, r, e in zip(todo, got, ended, strict=True)})
                cache.write_text(json.dumps(replies))
            for user in batch:
                tried += 1
                reply, ended = replies[user]
                better = edit(kind, reply) if ended and reply.strip() else None
                if better and better != reply.strip():
                    rows.append({"prompt": [{"role": "user", "content": user}],
                                 "chosen": [{"role": "assistant", "content": better}],
                                 "rejected": [{"role": "assistant", "content": reply.strip()}]})
            if len(rows) >= max(sizes):
                break
        print(f"[pairs] {kind}: {len(rows)} of the parent's replies to {tried} new questions qualify", flush=True)
        for n, path in paths.items():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")
        files[kind] = paths
    return files


def more_questions(pg, out: Path, parent_dir: Path, child_dir: Path, prefs: Path, questions: list[str]
                   ) -> dict[str, Any]:
    """The product's behaviour count (tuner.edits.behaviour) on `questions`, more new questions than the 24 a run
    asks: the edit shown and the degenerate replies, child and parent, each asked as the playground serves it (greedy,
    the run's reply budget). 24 questions cannot tell 0 degenerate replies from 1 or 2, and the target (at most 2%)
    is 0 of 24. Overuse here is counted against the parent's own reply to the question (the product's count before
    session 18), not the parent's next words. The parent's replies are kept in `out`."""
    from tuner.config import GenerationConfig
    from tuner.edits import behaviour, changes
    from tuner.messages import read_examples
    from tuner.playground import TUNED
    from tuner.train.voicecheck import reply_budget

    pg.load_run(parent_dir)
    agent = [m["content"] for r in read_examples(parent_dir / "data" / "train.jsonl") for m in r["messages"]
             if m["role"] == "assistant"]
    settings = GenerationConfig(temperature=0.0, max_new_tokens=reply_budget(pg.tokenizer, agent))
    asked = [[{"role": "user", "content": q}] for q in questions]
    cache = out / f"more-questions-parent-{settings.max_new_tokens}.json"
    said = {k: tuple(v) for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    todo = [q for q in questions if q not in said]
    if todo:
        got, ended = pg.answers([asked[questions.index(q)] for q in todo], [TUNED], settings,
                                run=parent_dir)[TUNED]
        said.update({q: (r, e) for q, r, e in zip(todo, got, ended, strict=True)})
        cache.write_text(json.dumps(said))
    pg.load_run(child_dir)
    child, child_ended = pg.answers(asked, [TUNED], settings, run=child_dir)[TUNED]
    rows = [json.loads(line) for line in prefs.read_text().splitlines() if line.strip()]
    found = changes(rows)
    if not found:
        return {"questions": len(questions), "sentence": "no edit found in the pairs"}
    counted = behaviour(found[0], [said[q][0] for q in questions], child, [said[q][1] for q in questions],
                        child_ended)
    return {"questions": len(questions), "budget": settings.max_new_tokens, "parent": counted["parent"],
            "child": counted["child"], "unasked": counted["unasked"], "unasked_of": counted["unasked_of"],
            "sentence": counted["sentence"],
            "replies": [{"prompt": q, "parent": said[q][0], "child": c} for q, c in zip(questions, child, strict=True)]}


def parent_answers(out: Path) -> tuple[int, dict[str, list[Any]]]:
    """The reply budget and the plain parent's (reply, ended) to each question more_questions asked it."""
    [cache] = sorted(out.glob("more-questions-parent-*.json"))
    return int(re.search(r"-(\d+)\.json$", cache.name).group(1)), json.loads(cache.read_text())


def first_edit(kind: str, reply: str) -> str | None:
    """The parent's reply up to and with the first word a replacement edit puts in it, or None where the edit does
    not apply: where a parent made to say the new word goes on from.

    >>> first_edit("spelled", "Yes I'm fine, I'm here"), first_edit("spelled", "Yes")
    ('Yes I am', None)
    """
    edited = edit(kind, reply) if kind in WORD else None
    found = re.search(NEW[kind], edited) if edited and edited != reply else None
    return edited[:found.end()] if found else None


def made_to_say(pg, out: Path, parent_dir: Path, kind: str, questions: list[str]) -> dict[str, Any]:
    """The parent itself, made to say a replaced word where its own reply said the old one (its first), then left
    to go on greedily within the reply budget: how many of its replies to `questions` then loop or never end, against
    its own replies (more_questions' cache). A child held to the parent's distributions after the new word (the
    anchor) starts from this, not from the parent's own count."""
    import torch

    from tuner.config import GenerationConfig
    from tuner.playground import TUNED
    from tuner.verdict import degenerate

    budget, said = parent_answers(out)
    pg.load_run(parent_dir)
    tok, ends = pg.tokenizer, sorted(pg.end_of_turn_ids)
    texts = pg.prompt_texts([[{"role": "user", "content": q}] for q in questions], TUNED,
                            GenerationConfig(temperature=0.0, max_new_tokens=budget), run=parent_dir)
    own = made = sites = 0
    with pg.column_model(TUNED, parent_dir) as model, torch.inference_mode():
        for q, text in zip(questions, texts, strict=True):
            reply, ended = said[q]
            bad = degenerate(reply, ended) is not None
            own += bad
            prefix = first_edit(kind, reply)
            if prefix is None:
                made += bad
                continue
            sites += 1
            ids = tok(text + prefix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
            room = budget - len(tok(prefix, add_special_tokens=False)["input_ids"])
            new = model.generate(ids, max_new_tokens=max(1, room), do_sample=False, eos_token_id=ends,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)[0, ids.shape[1]:].tolist()
            rest = tok.decode([t for t in new if t not in ends], skip_special_tokens=True)
            made += degenerate(prefix + rest, any(t in ends for t in new)) is not None
    return {"questions": len(questions), "sites": sites, "own": own, "made": made}


def edited_parent(pg, out: Path, kind: str, prefs: Path, questions: list[str]) -> dict[str, Any]:
    """The other way to teach a house style: a parent tuned (the same quick preset, the same conversations) on
    replies with the edit applied wherever it applies, asked `questions` as the plain parent was (more_questions'
    cache, its reply budget); the edit and the degenerate replies counted as a child's are (tuner.edits.behaviour),
    against the plain parent's."""
    from tuner.config import GenerationConfig
    from tuner.edits import behaviour, changes
    from tuner.playground import TUNED

    rows = [json.loads(line) for line in (out / "parent.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        for m in r["messages"]:
            if m["role"] == "assistant":
                m["content"] = edit(kind, m["content"]) or m["content"]
    raw, data, run_dir = out / f"parent-{kind}.jsonl", out / f"parent-data-{kind}", out / "runs" / f"parent-{kind}"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if not (data / "train.jsonl").is_file():
        convert(raw, data)
    status = parent_run(data, run_dir)
    budget, said = parent_answers(out)
    pg.load_run(run_dir)
    got, ended = pg.answers([[{"role": "user", "content": q}] for q in questions], [TUNED],
                            GenerationConfig(temperature=0.0, max_new_tokens=budget), run=run_dir)[TUNED]
    pairs = [json.loads(line) for line in prefs.read_text().splitlines() if line.strip()]
    counted = behaviour(changes(pairs)[0], [said[q][0] for q in questions], got, [said[q][1] for q in questions],
                        ended)
    return {"questions": len(questions), "parent": counted["parent"], "edited": counted["child"],
            "train_s": status.get("wall_s"), "sentence": counted["sentence"]}


def extra_questions(pool: list[tuple[str, str]], most_pairs: int, n: int) -> list[str]:
    """`n` questions of the corpus that no pair asks, each once: parent_pairs takes its pairs' questions from the
    first 8 x the most pairs asked (120 in every table) of `pool`, which holds none of the parent's.

    >>> pool = [(f"q{i % 1000}", "a") for i in range(1100)]
    >>> extra_questions(pool, 120, 3), len(extra_questions(pool, 120, 500))
    (['q960', 'q961', 'q962'], 40)
    """
    start = 8 * max(most_pairs, 120)
    asked = {normalise(q) for q, _ in pool[:start]}
    out: list[str] = []
    for q, _ in pool[start:]:
        if normalise(q) not in asked and len(out) < n:
            asked.add(normalise(q))
            out.append(q)
    return out


def _bad(counts: dict[str, int]) -> int:
    """Degenerate replies in one of tuner.edits.behaviour's counts: looped, never ended or empty."""
    return counts["looped"] + counts["unended"] + counts["empty"]


def more_table(rows: list[dict[str, Any]]) -> str:
    """The rows measured on more new questions (--more-questions): the edit shown and the degenerate replies.

    >>> n = {"shown": 3, "needed": 4, "looped": 1, "unended": 1, "empty": 0}
    >>> print(more_table([{"edit": "spelled", "pairs": 10, "recipe": "default", "more": {
    ...     "questions": 50, "child": n, "parent": {**n, "shown": 0, "unended": 0}, "unasked": 1, "unasked_of": 5}}]))
    ... # doctest: +NORMALIZE_WHITESPACE
    | edit | pairs | recipe | new questions | edit shown: child (parent) | overuse (parent's reply) | degenerate: child
    | degenerate: parent |
    |---|---|---|---|---|---|---|---|
    | spelled | 10 | default | 50 | 3/4 (0/4) | 1 of 5 | 2 (4.0%) | 1 (2.0%) |
    """
    head = ("| edit | pairs | recipe | new questions | edit shown: child (parent) | overuse (parent's reply) "
            "| degenerate: child | degenerate: parent |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r.get("more") or {}
        if "child" not in m:
            continue
        c, p = m["child"], m["parent"]
        bad = [_bad(c), _bad(p)]
        lines.append(f"| {r['edit']} | {r['pairs']} | {r['recipe']} | {m['questions']} "
                     f"| {c['shown']}/{c['needed']} ({p['shown']}/{p['needed']}) "
                     f"| {m['unasked']} of {m['unasked_of']} | {bad[0]} ({bad[0] / m['questions']:.1%}) "
                     f"| {bad[1]} ({bad[1] / m['questions']:.1%}) |")
    return "\n".join(lines) + "\n"


def stopping(pg, run_dir: Path) -> dict[str, float]:
    """Where the general-text perplexity goes: the same texts scored with the end-of-turn token's probability set
    aside (the product's own measure, tuner.train.voicecheck.general_perplexities: what the model lost of English,
    apart from wanting to stop), and the mean probability of the end of turn after a sentence's end (. ! ?), where a
    child taught to stop after one sentence puts it."""
    import torch

    from tuner.evaluate import general_texts, text_sequences
    from tuner.playground import TUNED
    from tuner.train.voicecheck import general_perplexities

    pg.load_run(run_dir)
    eos = pg.tokenizer.eos_token_id
    ends = {i for t, i in pg.tokenizer.get_vocab().items() if pg.tokenizer.convert_tokens_to_string([t]).strip()[-1:]
            in (".", "!", "?")}
    after_eos, n_after = 0.0, 0
    with pg.column_model(TUNED, run_dir) as model, torch.inference_mode():
        content_ppl = general_perplexities(model, pg.tokenizer, set_aside=[eos])[1]
        for ids, _ in text_sequences(pg.tokenizer, general_texts()):
            probs = torch.softmax(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float(), -1)
            at_end = torch.tensor([t in ends for t in ids[:-1]], device=probs.device)
            after_eos += float(probs[at_end, eos].sum())
            n_after += int(at_end.sum())
    return {"content_ppl": round(content_ppl, 3), "stop_after_sentence": round(after_eos / max(n_after, 1), 3)}


def _reply_prompts(run_dir: Path) -> list[list[dict[str, str]]]:
    """The new questions the product asked parent and child of this run, whole conversations as it asked them (its
    record keeps each one's last message)."""
    from tuner.messages import read_examples, read_jsonl
    from tuner.runs import Run
    from tuner.train.preference import BEHAVIOUR_PROMPTS, behaviour_prompts, is_paired

    run = Run(run_dir)
    rows = read_jsonl(run.preferences_file)
    val = run.data_file("validation.jsonl")
    return behaviour_prompts(read_examples(run.data_file("train.jsonl")), read_examples(val) if val.is_file() else [],
                             rows if is_paired(rows) else [], BEHAVIOUR_PROMPTS, run.config().seed)


def parent_words(pg, run_dir: Path, parent_dir: Path, kind: str, status: dict[str, Any]) -> dict[str, float] | None:
    """The parent's voice, by teacher forcing: each of the parent's replies to the new questions with the reviewers'
    edit applied, and the tokens of it that are the parent's own words (before the edit; around a replaced word,
    all but the word: tuner.train.editspan.read_edit), scored under the child and under the parent. The perplexity
    of those words: what the parent would say there is still what the child would say. Greedy replies cannot
    tell this: the same parent, decoded in fp32 instead of bf16, is only ~0.6 similar to itself (greedy_floor)."""
    import math

    import torch

    from tuner.playground import TUNED
    from tuner.templates import end_of_turn_token
    from tuner.train.editspan import read_edit

    replies = status.get("replies") or []
    prompts = _reply_prompts(run_dir)
    if not replies or [p[-1]["content"] for p in prompts[:len(replies)]] != [r["prompt"] for r in replies]:
        return None  # the questions cannot be rebuilt as the product asked them

    def ids(messages: list[dict[str, str]], **kw: Any) -> list[int]:
        out = pg.tokenizer.apply_chat_template(messages, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    pg.load_run(parent_dir)  # the tokenizer
    end = pg.tokenizer.convert_tokens_to_ids(end_of_turn_token(pg.tokenizer) or pg.tokenizer.eos_token)
    rows = []  # (the whole sequence, the positions of the parent's own words in it)
    for prompt, r in zip(prompts, replies, strict=False):
        expected = edit(kind, r["parent"]) or r["parent"].strip()
        head = ids(prompt, add_generation_prompt=True)
        said = ids(prompt + [{"role": "assistant", "content": r["parent"].strip()}])[len(head):]
        wanted = ids(prompt + [{"role": "assistant", "content": expected}])[len(head):]
        kept = [1] * len(wanted) if wanted == said else read_edit(wanted, said).kept  # no edit: all the parent's
        words = wanted.index(end) if end in wanted else len(wanted)  # the reply's words, not where it ends its turn
        rows.append((head + wanted, [len(head) + i for i, k in enumerate(kept[:words]) if k]))
    out = {}
    for name, where in (("child", run_dir), ("parent", parent_dir)):
        pg.load_run(where)
        nll, n = 0.0, 0
        with pg.column_model(TUNED, where) as model, torch.inference_mode():
            for seq, at in rows:
                if not at:
                    continue
                logits = model(input_ids=torch.tensor([seq], device=model.device)).logits[0].float()
                logps = torch.log_softmax(logits[[i - 1 for i in at]], -1)
                nll -= float(logps.gather(1, torch.tensor([seq[i] for i in at], device=logps.device)[:, None]).sum())
                n += len(at)
        out[f"{name}_ppl"] = round(math.exp(nll / max(n, 1)), 4)
    out["tokens"] = n
    return out


def greedy_floor(run_dir: Path, parent_dir: Path) -> dict[str, Any]:
    """The floor under the word-similarity voice measure: the parent's greedy replies to a run's new questions on
    the base the product asks them on (the playground's: tuner.train.voicecheck.served_model), in its dtype and in
    the other one (bf16 for fp32, and back), median word similarity, and the degenerate replies (loops, no end of
    turn) in each: what rounding alone does to them. Nothing about the parent changes but rounding."""
    import torch
    from peft import PeftModel

    from tuner.messages import read_examples
    from tuner.models import load_model, load_tokenizer
    from tuner.playground import serving_quantization
    from tuner.precision import serving_dtype
    from tuner.runs import Run
    from tuner.train.voicecheck import generate, reply_budget

    cfg = Run(run_dir).config()
    tok = load_tokenizer(cfg.base_model)
    prompts = _reply_prompts(run_dir)
    budget = reply_budget(tok, [m["content"] for r in read_examples(Run(run_dir).data_file("train.jsonl"))
                                for m in r["messages"] if m["role"] == "assistant"])
    used = serving_dtype("cpu")
    other = torch.bfloat16 if used != torch.bfloat16 else torch.float32
    quant = serving_quantization(Run(run_dir).status().get("quantization", "nf4"), "cpu")
    from tuner.verdict import degenerate

    got, bad = [], []
    for dtype in (used, other):
        base = load_model(cfg.base_model, quantization=quant, dtype=dtype, dev="cpu")
        replies, ended = generate(PeftModel.from_pretrained(base, str(parent_dir / "adapter")), tok, tok.chat_template,
                                  prompts, budget, batch_size=16)
        got.append(replies)
        bad.append(sum(degenerate(r, e) is not None for r, e in zip(replies, ended, strict=True)))
    scores = [SequenceMatcher(None, _words(a), _words(b), autojunk=False).ratio() for a, b in zip(*got, strict=True)]
    return {"similarity": round(statistics.median(scores), 3), "identical": sum(a == b for a, b in zip(*got, strict=True)),
            "replies": len(scores), "precisions": [str(used).removeprefix("torch."), str(other).removeprefix("torch.")],
            "degenerate": bad}


def run_cli(args: list[str], what: str) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(_cli(*args), cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "command_s": round(time.monotonic() - started, 1)}


def parent_run(data: Path, run_dir: Path) -> dict[str, Any]:
    """The parent, trained once: a finished record and adapter in `run_dir` are reused."""
    record = run_dir.parent / f"{run_dir.name}.json"
    if record.is_file() and (run_dir / "adapter").is_dir():
        status = json.loads(record.read_text())
        if status.get("status") == "completed":
            return status
    status = run_cli(["train", "--data", str(data), "--out", str(run_dir), "--preset", "quick", "--json"], "parent")
    if status.get("status") != "completed":
        raise SystemExit(f"the parent did not complete: {status.get('error')}")
    record.write_text(json.dumps(status))
    return status


def recipe_overrides(name: str, beta: float | None = None, learning_rate: float | None = None) -> dict[str, Any]:
    """A named recipe as PreferenceConfig overrides, the settings equal to the defaults left out (so one run
    has one cache folder whatever it is called), except those the product sets per edit (EDIT_SETTINGS): a
    default given there keeps the product from taking the edit's setting, as the same flag does on the command line.

    'default' (the product's settings); 'kto' (KTO on the pairs, unpaired: chosen up, rejected down);
    'LOSS' (a DPO-family loss of trl's alone: sigmoid, ipo, apo_zero, robust, hinge; without the product's edit
    term and anchor); 'LOSS+sft' (the same plus trl's fine-tuning term on the whole chosen replies, weight 1); or
    raw 'key=value,...'.

    >>> recipe_overrides("ipo+sft", beta=0.5)
    {'anchor_weight': 0.0, 'beta': 0.5, 'edit_weight': 0.0, 'loss': 'ipo', 'sft_weight': 1.0}
    >>> recipe_overrides("sigmoid")
    {'anchor_weight': 0.0, 'edit_weight': 0.0}
    >>> recipe_overrides("anchor_weight=1,num_epochs=1.5,beta=0.1")  # the defaults, not a cut's or a word's
    {'anchor_weight': 1, 'num_epochs': 1.5}
    """
    from tuner.config import EDIT_SETTINGS, PreferenceConfig, choices

    loss_choices = choices(PreferenceConfig, "loss") or ()
    values: dict[str, Any] = {}
    if name == "kto":
        values["method"] = "kto"
    elif name.removesuffix("+sft") in loss_choices:
        values.update(loss=name.removesuffix("+sft"), sft_weight=1.0 if name.endswith("+sft") else 0.0,
                      edit_weight=0.0, anchor_weight=0.0)
    elif name != "default":
        for part in filter(None, (p.strip() for p in name.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise SystemExit(f"unknown recipe '{name}': use default, kto, {', '.join(loss_choices)} (+sft), "
                                 "or key=value,...")
            values[key.strip()] = _value(value.strip())
    if beta is not None:
        values["beta"] = beta
    if learning_rate is not None:
        values["learning_rate"] = learning_rate
    defaults = PreferenceConfig().to_dict()
    PreferenceConfig.from_dict(values)  # an unknown or invalid setting stops here, before any training
    per_edit = {key for settings in EDIT_SETTINGS.values() for key in settings}
    return {k: v for k, v in sorted(values.items()) if k in per_edit or defaults.get(k) != v}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def slug(overrides: dict[str, Any]) -> str:
    """The cache folder's name for a recipe's overrides.

    >>> slug({'beta': 0.5, 'loss': 'ipo'}), slug({})
    ('beta=0.5,loss=ipo', 'default')
    """
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def settings_digest(overrides: dict[str, Any], prefs: Path | None = None) -> str:
    """A fingerprint of every setting the child trains with (the defaults included, and the settings the product
    takes for the edit the pairs in `prefs` make: tuner.config.EDIT_SETTINGS) and of the loss's version
    (tuner.train.editspan.LOSS_VERSION), in its cache folder's name: when a default or the loss changes, 'default'
    is a new recipe and is trained again, not read from the cache."""
    import hashlib

    from tuner.config import PreferenceConfig
    from tuner.edits import settings_for_edit
    from tuner.train.editspan import LOSS_VERSION

    full = PreferenceConfig.from_dict(overrides)
    if prefs is not None:
        rows = [json.loads(line) for line in Path(prefs).read_text().splitlines() if line.strip()]
        full, _applied = settings_for_edit(full, rows, given=set(overrides) - {"method"})
    key = full.to_dict()
    if LOSS_VERSION > 1:  # the loss's code: a changed loss trains again (version 1's runs were keyed without it)
        key["loss_version"] = LOSS_VERSION
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def recipe_flags(overrides: dict[str, Any]) -> list[str]:
    """{'method': 'kto', 'beta': 0.5} -> ['--method', 'kto', '--beta', '0.5'] (dpo unless the recipe says)."""
    flags = ["--method", str(overrides.get("method", "dpo"))]
    for key, value in overrides.items():
        if key != "method":
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def child_run(parent: Path, prefs: Path, overrides: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    record = run_dir.parent / f"{run_dir.name}.json"
    if record.is_file():
        return json.loads(record.read_text())
    if run_dir.exists():  # an earlier command stopped half-way: start it again
        import shutil

        shutil.rmtree(run_dir)
    status = run_cli(["train", "--from", str(parent), "--prefs", str(prefs), "--out", str(run_dir), "--json",
                      *recipe_flags(overrides)], f"child {run_dir.name}")
    record.write_text(json.dumps(status))
    return status


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)*|[^\w\s]", text.lower())


def voice_kept(kind: str, replies: list[dict[str, str]]) -> float | None:
    """Median similarity (difflib ratio over words, 0 to 1) of each child reply to the parent's reply to the same
    new question with the reviewers' edit applied: 1.0 when the child says what the parent said, edited.

    >>> voice_kept("closing", [{"parent": "Yes I do", "child": "Yes I do. Cheers from the Juniper crew!"}])
    1.0
    """
    scores = []
    for r in replies:
        expected = edit(kind, r["parent"]) or r["parent"].strip()
        scores.append(SequenceMatcher(None, _words(expected), _words(r["child"]), autojunk=False).ratio())
    return round(statistics.median(scores), 3) if scores else None


EXPECTED = {"closing": f"adds '{CLOSING}' at the end", "term": "says 'grand' instead of 'good'",
            "spelled": "says 'I am' instead of 'I'm'",
            "shorter": "shortens the reply"}


def row(kind: str, n: int, recipe: str, overrides: dict[str, Any], status: dict[str, Any],
        parent_ppl: float | None, parent_stopping: dict[str, float] | None = None) -> dict[str, Any]:
    behaviour = status.get("behaviour") or {}
    lead = (behaviour.get("changes") or [{}])[0]
    child, before = dict(lead.get("child") or {}), lead.get("parent") or {}
    if child and status.get("replies"):  # graded as tuner grades today: replies graded before session 14 counted an
        from tuner.verdict import degenerate  # empty reply as a short one, the closing alone as a closed reply

        besides = CLOSING if kind == "closing" else ""
        empty = sum(degenerate(r["child"], True, besides) == "empty" for r in status["replies"])
        missed_then = empty - child.get("empty", 0)
        child.update(empty=empty, shown=child["shown"] - (missed_then if kind not in WORD else 0))
    pm = status.get("preference_metrics") or {}
    tuned = status.get("general_ppl")
    change = tuned / parent_ppl - 1 if tuned and parent_ppl else None
    applied = (status.get("edit_settings") or {}).get("settings") or {}  # what the product set for the edit
    out = {"edit": kind, "pairs": n, "recipe": recipe, "settings": {**overrides, **applied}, "status": status.get("status"),
           "error": status.get("error"), "change_found": lead.get("change"), "shown": child.get("shown"),
           "needed": child.get("needed", child.get("prompts")), "prompts": child.get("prompts"),
           "parent_shown": before.get("shown"), "parent_needed": before.get("needed", before.get("prompts")),
           "degenerate": (child.get("looped") or 0) + (child.get("unended") or 0) + (child.get("empty") or 0)
           if child else None,
           "learned": behaviour.get("learned"), "result": status.get("result"),
           "pair_accuracy": [(pm.get("before") or {}).get("accuracy"), (pm.get("after") or {}).get("accuracy")],
           "held_out_pairs": pm.get("held_out_pairs"), "ppl_change_vs_parent": change,
           # the perplexity with the end of turn set aside, and the end of turn after a sentence: child (parent)
           "content_ppl_change": (status["stopping"]["content_ppl"] / parent_stopping["content_ppl"] - 1)
           if status.get("stopping") and parent_stopping else None,
           "stop_after_sentence": [(parent_stopping or {}).get("stop_after_sentence"),
                                   (status.get("stopping") or {}).get("stop_after_sentence")],
           "voice_kept": voice_kept(kind, status.get("replies") or []),
           # the parent's own words on the new questions, teacher-forced: perplexity under the child vs the parent
           "parent_words_change": (status["parent_words"]["child_ppl"] / status["parent_words"]["parent_ppl"] - 1)
           if status.get("parent_words") else None,
           **overuse(kind, lead, status.get("replies") or []),
           "repeated": [repeated(lead, "parent", status), repeated(lead, "child", status)],
           "steps": status.get("step"), "command_s": status.get("command_s")}
    out["missed"] = missed(out)
    return out


def repeated(lead: dict[str, Any], who: str, status: dict[str, Any]) -> int | None:
    """The replies that say word for word what another new question got (tuner.edits.behaviour's count; counted
    here for records from before it counted)."""
    from collections import Counter

    from tuner.edits import _fold

    if (lead.get(who) or {}).get("repeated") is not None:
        return lead[who]["repeated"]
    said = Counter(_fold(r[who]) for r in status.get("replies") or [] if r[who].strip())
    return sum(n for n in said.values() if n > 1) if said else None


def overuse(kind: str, lead: dict[str, Any], replies: list[dict[str, str]]) -> dict[str, Any]:
    """For a replaced word: `unasked`, the child's replies that put the new word where there was nothing to replace
    (the term overused), of `unasked_of` replies, as the product counts them: since session 18 the child's replies
    that say the word, asked of the parent at that point (`unasked_by` "the parent's next words"); before, the
    replies where the parent's own reply said neither word ("the parent's reply"). Records from before the product
    counted at all are counted here the old way."""
    if kind not in WORD:
        return {"unasked": None, "unasked_of": None, "unasked_by": None}
    if lead.get("unasked") is not None:
        return {"unasked": lead["unasked"], "unasked_of": lead.get("unasked_of", lead.get("without_either")),
                "unasked_by": lead.get("unasked_by") or "the parent's reply"}
    neither = [not (WORD[kind].search(r["parent"]) or re.search(NEW[kind], r["parent"], re.I)) for r in replies]
    return {"unasked": sum(n and bool(re.search(NEW[kind], r["child"], re.I)) for n, r in zip(neither, replies, strict=True)),
            "unasked_of": sum(neither), "unasked_by": "the parent's reply"}


def missed(r: dict[str, Any]) -> list[str]:
    """The targets a row misses (empty: PASS)."""
    if r["status"] != "completed":
        return [f"run {r['status']}"]
    out = []
    if r["change_found"] != EXPECTED[r["edit"]]:
        out.append(f"edit read as {r['change_found']!r}")
    if not r["needed"] or (r["shown"] or 0) < LEARNED * r["needed"]:
        out.append("edit")
    if r["degenerate"] is None or r["degenerate"] > DEGENERATE * (r["prompts"] or 0):
        out.append("degenerate")
    if r.get("unasked") and r["unasked"] > (1 - LEARNED) * (r.get("unasked_of", r.get("without_either")) or 0):
        out.append("overuse")  # the product's verdict too: the word where the parent's reply had none to replace
    parent_same, child_same = r.get("repeated") or [None, None]
    if child_same is not None and child_same >= STOCK_SHARE * (r["prompts"] or 0) > (parent_same or 0):
        out.append("stock replies")  # the product's verdict too
    if r["ppl_change_vs_parent"] is None or r["ppl_change_vs_parent"] > PPL_MAX:
        out.append("ppl")
    if r.get("parent_words_change") is None or r["parent_words_change"] > VOICE_PPL_MAX:
        out.append("voice")
    return out


def _settings(r: dict[str, Any]) -> str:
    """beta and learning rate as the run used them, and any other setting the recipe changed."""
    from tuner.config import PreferenceConfig

    s = {**PreferenceConfig().to_dict(), **(r.get("settings") or {})}
    extra = [f"{k} {v}" for k, v in (r.get("settings") or {}).items()
             if k not in ("beta", "learning_rate", "loss", "sft_weight", "method")]
    return ", ".join([f"{s['beta']}, {s['learning_rate']:g}", *extra])


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| edit | pairs | recipe | beta, lr | edit shown: child (parent) | degenerate | same reply: child (parent) "
            "| ppl vs parent "
            "| without the end of turn | end of turn after a sentence | parent's words: ppl | voice kept: words "
            "| held-out pair acc. | steps "
            "| command s | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc, ppl = r["pair_accuracy"], r["ppl_change_vs_parent"]
        verdict = "**PASS**" if not r["missed"] else "MISS: " + ", ".join(r["missed"])
        of = r.get("unasked_of", r.get("without_either"))
        unasked = ("" if r.get("unasked") is None else f"; {r['unasked']} unasked" + (f" of {of}" if of is not None else "")
                   + (" (next words)" if r.get("unasked_by") == "the parent's next words" else ""))
        lines.append(
            f"| {r['edit']} | {r['pairs']}{' (bot)' if r.get('pairs_from') == 'parent' else ''} | {r['recipe']} "
            f"| {_settings(r)} "
            f"| {r['shown']}/{r['needed']} ({r['parent_shown']}/{r['parent_needed']}){unasked} | {r['degenerate']} "
            f"| {_same(r)} "
            f"| {_pct(ppl)} | {_pct(r.get('content_ppl_change'))} | {_stop(r)} "
            f"| {_pct(r.get('parent_words_change'))} | {r['voice_kept']} "
            f"| {acc[0]} -> {acc[1]} on {r['held_out_pairs']} | {r['steps']} | {r['command_s']} | {verdict} |")
    return "\n".join(lines) + "\n"


def _same(r: dict[str, Any]) -> str:
    parent, child = r.get("repeated") or [None, None]
    return "—" if child is None else f"{child} ({parent})"


def floor_line(parent: dict[str, Any]) -> str:
    """The word-similarity voice's floor, in a sentence (empty before it is measured)."""
    f = parent.get("greedy_floor")
    if not f:
        return ""
    return (f" The same parent's greedy replies in {f['precisions'][1]} against {f['precisions'][0]} (nothing changed"
            f" but rounding): {f['similarity']} word similarity, median, {f['identical']} of {f['replies']} identical"
            + (f"; degenerate: {f['degenerate'][0]} of {f['replies']} in {f['precisions'][0]}, {f['degenerate'][1]} in "
               f"{f['precisions'][1]}." if "degenerate" in f else "."))


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1%}"


def _stop(r: dict[str, Any]) -> str:
    parent, child = r.get("stop_after_sentence") or [None, None]
    return "—" if child is None else f"{child:.2f} ({parent:.2f})"


def _floats(text: str | None) -> list[float | None]:
    return [float(x) for x in text.split(",")] if text else [None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/preference.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=",".join(DEFAULT_RECIPES),
                   help="Comma-separated named recipes: default (the product's), kto, or a loss (sigmoid, ipo, "
                        f"apo_zero, robust, hinge) alone or with the fine-tuning term ('ipo+sft'). Default: "
                        f"{','.join(DEFAULT_RECIPES)}.")
    p.add_argument("--recipes", action="append", default=[],
                   help="Raw PreferenceConfig overrides 'key=value,...' (repeatable), besides --recipe.")
    p.add_argument("--beta", default=None, help="Comma-separated betas (default: the config's).")
    p.add_argument("--lr", default=None, help="Comma-separated learning rates (default: the config's).")
    p.add_argument("--edits", default=",".join(EDITS), help=f"Comma-separated edit kinds ({', '.join(EDITS)}).")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Comma-separated pair counts.")
    p.add_argument("--parent-size", type=int, default=300, help="The parent's training conversations (300).")
    p.add_argument("--val-size", type=int, default=40, help="Its validation conversations: the new questions (40).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs-from", choices=("corpus", "parent"), default="corpus",
                   help="The rejected replies: the corpus's (corpus, the default), or the parent bot's own replies to "
                        "the same questions (parent): what reviewers edit in the product.")
    p.add_argument("--out", default="/tmp/prefbench", help="Cache and work folder (default /tmp/prefbench): the "
                   "parent is trained once, finished children are not trained again.")
    p.add_argument("--stop-at", default=None, metavar="HH:MM",
                   help="UTC time after which no new run starts (the table of the finished ones is still printed).")
    p.add_argument("--more-questions", type=int, default=0, metavar="N",
                   help="Also ask parent and each child N more new questions (the corpus's, outside the parent's data "
                        "and every pair) and count the edit and the degenerate replies on them (more_questions).")
    p.add_argument("--edited-parent", default=None, metavar="KIND",
                   help="With --more-questions: also tune a parent on its conversations with the edit KIND applied "
                        "to every reply it applies to, and count the edit and the degenerate replies on the same "
                        "questions (edited_parent).")
    p.add_argument("--report", action="store_true", help="Print the table of every cached result; train nothing.")
    return p


def _load(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    results_file = out / "results.json"
    if args.report:
        print(f"Machine: {machine()}.\n\n" + table(list(_load(results_file).values())))
        return 0
    sizes = tuple(int(s) for s in args.sizes.split(","))
    kinds = [k.strip() for k in args.edits.split(",") if k.strip()]
    grid = [(name, recipe_overrides(name, b, lr)) for name in [n.strip() for n in args.recipe.split(",") if n.strip()]
            for b in _floats(args.beta) for lr in _floats(args.lr)]
    grid += [(raw, recipe_overrides(raw)) for raw in args.recipes]
    utc = dt.timezone.utc
    stop = (dt.datetime.combine(dt.datetime.now(utc).date(), dt.time.fromisoformat(args.stop_at), utc)
            if args.stop_at else None)
    if stop is not None and stop < dt.datetime.now(utc) - dt.timedelta(hours=12):  # 00:20 given at 23:50: tomorrow
        stop += dt.timedelta(days=1)
    tag = f"p{args.parent_size}-v{args.val_size}-s{args.seed}"
    made = build(out / tag, args.parent_size, args.val_size, sizes, args.seed)
    if not (out / tag / "parent-data" / "train.jsonl").is_file():
        convert(made["raw"], out / tag / "parent-data")
    parent_dir = out / tag / "runs" / "parent"
    parent = parent_run(out / tag / "parent-data", parent_dir)
    from tuner.playground import Playground

    pg = Playground()
    if parent.get("general_ppl") is None or parent.get("stopping") is None:
        parent["general_ppl"] = parent.get("general_ppl") or general_perplexity(pg, parent_dir).get("tuned")
        parent["stopping"] = stopping(pg, parent_dir)
        (parent_dir.parent / f"{parent_dir.name}.json").write_text(json.dumps(parent))
    pairs = made["pairs"]
    if args.pairs_from == "parent":
        pairs = parent_pairs(out / tag, pg, parent_dir, sizes, args.seed, kinds, made["pool"])
    results, rows = _load(results_file), []
    extra = extra_questions(made["pool"], max(sizes), args.more_questions) if args.more_questions else []
    for n in sizes:
        for kind in kinds:
            for label, overrides in grid:
                name = re.sub(r'[^A-Za-z0-9.=,_-]+', '_', slug(overrides))
                source = "" if args.pairs_from == "corpus" else "onpolicy-"
                child_dir = out / tag / "runs" / f"{source}{kind}-{n}-{name}-{settings_digest(overrides, pairs[kind][n])}"
                record = child_dir.parent / f"{child_dir.name}.json"
                if not record.is_file() and stop and dt.datetime.now(utc) >= stop:
                    print(f"past {args.stop_at} UTC: {child_dir.name} not started", flush=True)
                    continue
                status = child_run(parent_dir, pairs[kind][n], overrides, child_dir)
                if status.get("status") == "completed" and (status.get("general_ppl") is None
                                                            or status.get("stopping") is None
                                                            or "parent_words" not in status):
                    status["general_ppl"] = status.get("general_ppl") or general_perplexity(pg, child_dir).get("tuned")
                    status["stopping"] = status.get("stopping") or stopping(pg, child_dir)
                    status["parent_words"] = parent_words(pg, child_dir, parent_dir, kind, status)
                    record.write_text(json.dumps(status))
                if status.get("status") == "completed" and "degenerate" not in (parent.get("greedy_floor") or {}):
                    parent["greedy_floor"] = greedy_floor(child_dir, parent_dir)
                    (parent_dir.parent / f"{parent_dir.name}.json").write_text(json.dumps(parent))
                r = {**row(kind, n, label, overrides, status, parent["general_ppl"], parent.get("stopping")),
                     "pairs_from": args.pairs_from}
                key = f"more{args.more_questions}"
                if args.more_questions and status.get("status") == "completed" and key not in status:
                    status[key] = more_questions(pg, out / tag, parent_dir, child_dir, pairs[kind][n], extra)
                    record.write_text(json.dumps(status))
                if args.more_questions and key in status:
                    r["more"] = {k: v for k, v in status[key].items() if k != "replies"}
                if args.more_questions and kind in WORD and f"{kind}-{args.more_questions}" not in parent.get(
                        "made_to_say", {}):
                    parent.setdefault("made_to_say", {})[f"{kind}-{args.more_questions}"] = made_to_say(
                        pg, out / tag, parent_dir, kind, extra)
                    (parent_dir.parent / f"{parent_dir.name}.json").write_text(json.dumps(parent))
                rows.append(r)
                results[f"{tag}/{child_dir.name}"] = r
                results_file.write_text(json.dumps(results, indent=1))
                print(table([r]).splitlines()[-1], flush=True)
    text = (f"Machine: {machine()}. Parent: quick preset on {args.parent_size} chitchat-dataset conversations "
            f"(plain replies); new questions: its validation prompts outside the pairs.{floor_line(parent)}\n\n"
            + table(rows))
    if args.more_questions:
        text += f"\nOn {args.more_questions} more new questions:\n\n" + more_table(rows)
        if args.edited_parent:
            e = edited_parent(pg, out / tag, args.edited_parent, pairs[args.edited_parent][max(sizes)], extra)
            bad = [_bad(e["edited"]), _bad(e["parent"])]
            text += (f"\nA parent tuned on its conversations with '{args.edited_parent}' applied to every reply: the "
                     f"edit on {e['edited']['shown']} of {e['edited']['needed']} replies it applies to (the plain "
                     f"parent: {e['parent']['shown']} of {e['parent']['needed']}), {bad[0]} of {e['questions']} "
                     f"degenerate (the plain parent: {bad[1]}).\n")
        for what, m in (parent.get("made_to_say") or {}).items():
            text += (f"\nThe parent made to say the new word of '{what.rsplit('-', 1)[0]}' where its own reply said "
                     f"the old one ({m['sites']} of {m['questions']} replies), then left to go on: {m['made']} "
                     f"degenerate (its own replies: {m['own']}).\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
