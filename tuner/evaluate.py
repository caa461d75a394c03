"""Tune, prompt or retrieve? Three ways on held-out prompts, with numbers, and did tuning forget anything?

`evaluate(run)` answers the validation split's held-out conversations (or a prompts file) three
ways, with the same seed and settings, each column batched on its own so its seconds are its own:

- base: the base model told the brand brief (the playground's prompt-only column),
- retrieved: the same, shown the k training exchanges most like the question (tuner.retrieve, BM25),
- tuned: the run's model,

writes `eval.json` and a readable `eval.md` into the run folder, and scores each column:

- the agents' habit (the sign-off or opening most training replies share) and degenerate replies,
- chrF against the reference replies (sacrebleu): closeness to the agents' own answers,
- the rate of the brand's recurring openings/sign-offs, mined from the run's training replies,
- reply length vs the references, prompt tokens read and seconds per reply,
- loss/perplexity on the held-out replies (assistant tokens only), base weights vs tuned,
- perplexity on general English text shipped with tuner: the forgetting check,
- what the tuned model memorised (tuner.memorisation): copied spans, personal data, planted canaries,

and says in one sentence which way to ship (tuner.verdict.ship_sentence).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tuner import memorisation
from tuner.config import GenerationConfig, add_config_arguments, config_overrides
from tuner.errors import DataError, TunerError
from tuner.messages import iter_jsonl
from tuner.retrieve import RETRIEVE_K
from tuner.runs import Run, read_json_object, resolve
from tuner.verdict import Marker, Way, ship_sentence, tally, without_habit
from tuner.voice import brand_phrases, habit_of, phrase_rate, training_replies

__all__ = ["METRIC_HELP", "METRIC_LABELS", "Stopped", "brand_phrases", "evaluate", "load_cases", "phrase_rate",
           "saved_result", "to_markdown"]

GENERAL_TEXT = Path(__file__).parent / "resources" / "general_text.jsonl"
EVAL_BATCH = 8  # prompts generated together (x columns rows in one batch): on a CPU a decoding step of 24
# rows took 1.09x one of 8 (fp32, SmolLM2-135M, Intel Xeon with AMX), so fewer, larger batches finish sooner
LOSS_LIMIT = 64  # held-out conversations scored for validation loss
COLUMNS = ("base", "retrieved", "tuned")  # the three ways, as eval.json's rows and metrics name them
PLAYGROUND_COLUMN = {"base": "prompted", "retrieved": "retrieved", "tuned": "tuned"}  # tuner.playground's columns
LOSS_COLUMNS = ("base", "tuned")  # losses score weights (adapter off, on); the brief and examples change no weight
WAY_NAMES = {"base": "prompting", "retrieved": "retrieval", "tuned": "tuning"}  # in the ship sentence
COLUMN_LABELS = {"base": "base + brand brief", "retrieved": "retrieved examples", "tuned": "tuned"}  # on the page

METRIC_HELP = {
    "habit": "Replies that carry the agents' habit exactly (the sign-off or opening that at least half of the "
             "training replies share), of all replies.",
    "chrf": "chrF (0-100): character n-gram overlap with the agents' real reply, the sign-off or greeting left out "
            "of both (the habit has its own row); higher means closer to what they answered.",
    "degenerate": "Replies that looped, never ended their turn (cut at the token limit) or said nothing.",
    "brand_phrase_rate": "Share of replies using the brand's recurring openings or sign-offs (mined from the training replies).",
    "length_words": "Reply length in words (median, 10th-90th percentile); a voice match has the references' shape.",
    "prompt_tokens": "Tokens the model reads per reply (mean): the system prompt, retrieval's examples and the question.",
    "seconds_per_reply": "Generate time per reply on this machine, each column batched on its own.",
    "validation_loss": "Loss on the held-out real replies (lower is better): how well the model predicts the brand's own words.",
    "validation_perplexity": "exp(validation loss): the number of words the model hesitates between, on average (lower is better).",
    "general_perplexity": "Perplexity on general English shipped with tuner (lower is better); a rise after tuning is forgetting.",
    memorisation.METRIC: "Tuned replies copying 12+ words of a training reply, personal data they emit that the training "
                         "data holds, and planted canaries the tuned model completes (exposure: Carlini et al. 2019).",
}
METRIC_LABELS = {  # the metric names a person reads (eval.json keeps the keys)
    "habit": "Replies with the agents' habit",
    "chrf": "Wording close to the agents' reply (chrF)",
    "degenerate": "Replies that looped, never ended or said nothing",
    "brand_phrase_rate": "Replies using the brand's phrases",
    "length_words": "Reply length in words",
    "prompt_tokens": "Prompt tokens read per reply",
    "seconds_per_reply": "Seconds per reply",
    "validation_loss": "Loss on the real replies",
    "validation_perplexity": "Perplexity on the real replies",
    "general_perplexity": "Perplexity on general English (forgetting)",
    memorisation.METRIC: "What the tuned model memorised",
}
ProgressFn = Callable[[int, int, str], None]  # (prompts done, prompts in all, what is happening)


class Stopped(TunerError):
    """The caller asked the evaluation to stop; nothing was written."""


STOPPED = "The evaluation was stopped; the previous eval.json (if any) is unchanged."


# -- text metrics ----------------------------------------------------------------------------------


def chrf(hypotheses: Sequence[str], references: Sequence[str], marker: Marker | None = None) -> float | None:
    """chrF of the replies against the agents' replies, on their content: a sign-off or greeting `marker` is
    taken out of both first (the habit is counted on its own; left in, it would make a reply that is only the
    sign-off look close to every agent reply)."""
    from sacrebleu.metrics import CHRF

    if not hypotheses:
        return None
    hyps = [without_habit(h, marker) for h in hypotheses]
    refs = [without_habit(r, marker) for r in references]
    return round(CHRF().corpus_score(hyps, [refs]).score, 2)


def length_stats(replies: Sequence[str]) -> dict[str, float] | None:
    if not replies:
        return None
    words = sorted(len(r.split()) for r in replies)

    def pct(q: float) -> float:
        return float(words[min(len(words) - 1, int(q * len(words)))])

    return {"median": float(statistics.median(words)), "p10": pct(0.1), "p90": pct(0.9),
            "mean": round(statistics.fmean(words), 1)}


# -- losses ----------------------------------------------------------------------------------------


def mean_loss(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int = 0,
              batch_size: int = 8) -> float | None:
    """Token-weighted mean cross-entropy of `labels` (-100 = not scored) given `input_ids`.

    Sequences are length-sorted and right-padded into batches; padding is never scored.
    """
    return mean_losses(model, sequences, pad_id, batch_size)[0]


def mean_losses(model, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int = 0, batch_size: int = 8,
                set_aside: Sequence[int] = ()) -> tuple[float | None, float | None]:
    """mean_loss, and the same with the tokens `set_aside` left out of every prediction (each scored token's
    probability renormalised over the rest; None without `set_aside`), from one pass. A model taught to end its turn
    after a sentence puts its probability on the end of turn there: that is the edit, not lost English."""
    import torch

    total = aside_total = 0.0
    count = 0
    ordered = sorted((s for s in sequences if any(t != -100 for t in s[1][1:])), key=lambda s: len(s[0]))
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            x = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=model.device)
            y = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=model.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=model.device)
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            target = y[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            if set_aside:  # log p(aside) = logsumexp over the aside ids - logsumexp over all
                aside = (torch.logsumexp(logits[..., list(set_aside)], -1) - torch.logsumexp(logits, -1)).exp()
                aside_total += float(loss) + float(torch.log1p(-aside.clamp(max=1 - 1e-6))[target != -100].sum())
            count += int((target != -100).sum())
    if not count:
        return None, None
    return total / count, (aside_total / count if set_aside else None)


def _fingerprint(*paths: Path) -> str:
    """Changes when any of the files does: losses are reused only for the same adapter and data."""
    parts = []
    for p in paths:
        st = p.stat() if p.is_file() else None
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}" if st else f"{p}:-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def loss_metrics(pg, info, max_length: int, loss_limit: int = LOSS_LIMIT) -> dict[str, dict[str, float | None]]:
    """Validation loss/perplexity and general-text perplexity, base vs tuned (adapter off and on).

    They do not depend on sampling settings, so an earlier eval.json of the same adapter and data
    is reused.
    """
    run_dir = info.run_dir
    val_file = Run(run_dir).data_file("validation.jsonl")
    weights = [p for p in info.adapter_dir.iterdir() if p.suffix == ".safetensors"]
    key = _fingerprint(val_file, GENERAL_TEXT, *sorted(weights)) + f":{loss_limit}:{max_length}"
    previous = read_json_object(Run(run_dir).eval_file)
    if previous.get("loss_fingerprint") == key and isinstance(previous.get("losses"), dict):
        return {**previous["losses"], "fingerprint": key}
    validation = [c["messages"] + [{"role": "assistant", "content": c["reference"]}]
                  for c in load_cases(run_dir, None, None) if c["reference"] is not None][:loss_limit] \
        if val_file.is_file() else []
    val_seqs = assistant_sequences(pg.tokenizer, validation, max_length) if validation else []
    gen_seqs = text_sequences(pg.tokenizer, general_texts())
    out: dict[str, dict[str, float | None]] = {"validation_loss": {}, "validation_perplexity": {},
                                                "general_perplexity": {}}
    pad = pg.tokenizer.pad_token_id or 0
    for col in LOSS_COLUMNS:
        with pg.column_model(col, run_dir) as model:
            val_loss = mean_loss(model, val_seqs, pad) if val_seqs else None
            gen_loss = mean_loss(model, gen_seqs, pad)
        out["validation_loss"][col] = round(val_loss, 4) if val_loss is not None else None
        out["validation_perplexity"][col] = _ppl(val_loss)
        out["general_perplexity"][col] = _ppl(gen_loss)
    out["fingerprint"] = key  # type: ignore[assignment]
    return out


def assistant_sequences(tokenizer, conversations: Sequence[list[dict]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with labels only on assistant tokens, as in training."""
    from tuner.templates import assistant_mask

    out = []
    for conv in conversations:
        ids, mask = assistant_mask(tokenizer, conv)
        ids, mask = ids[:max_length], mask[:max_length]
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]))
    return out


def text_sequences(tokenizer, texts: Sequence[str], max_length: int = 256) -> list[tuple[list[int], list[int]]]:
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        out.append((ids, list(ids)))
    return out


def general_texts() -> list[str]:
    """The shipped general-English paragraphs for the forgetting check."""
    return [json.loads(line)["text"] for line in GENERAL_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ppl(loss: float | None) -> float | None:
    return round(math.exp(loss), 3) if loss is not None else None


# -- prompts ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    return list(iter_jsonl(path))


def _case_from(value: Any, file: str, line: int | None) -> dict[str, Any] | None:
    """One eval case {messages (ending with the user turn), reference} from a prompt-file entry."""
    if isinstance(value, str):
        return {"messages": [{"role": "user", "content": value}], "reference": None}
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        ref = value.get("reference")
        return {"messages": [{"role": "user", "content": value["prompt"]}],
                "reference": ref if isinstance(ref, str) else None}
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        return case_from_messages(value["messages"], file, line)
    raise DataError("expected a prompt string, {\"prompt\": ..., \"reference\": ...} or {\"messages\": [...]}.", file, line)


def case_from_messages(messages: list, file: str, line: int | None) -> dict[str, Any] | None:
    """A conversation -> prompt (everything before the last assistant reply) + that reply as reference."""
    msgs = [m for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:  # no reply to compare with: the conversation itself is the prompt
        if not msgs or msgs[-1]["role"] != "user":
            raise DataError("the conversation has no user message to answer.", file, line)
        return {"messages": msgs, "reference": None}
    prompt = msgs[:last]
    if not any(m["role"] == "user" for m in prompt):
        return None  # the assistant spoke first: nothing to prompt with
    while prompt and prompt[-1]["role"] != "user":
        prompt.pop()
    return {"messages": prompt, "reference": msgs[last]["content"]}


def load_cases(run_dir: Path, prompts_file: str | Path | None, limit: int | None) -> list[dict[str, Any]]:
    """Eval cases from a prompts file (JSON list or JSONL), or the run's validation split."""
    cases: list[dict[str, Any]] = []
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise DataError("file not found.", str(path))
        if path.suffix == ".jsonl":
            entries = _read_jsonl(path)
        else:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"not valid JSON ({exc}). Fix: a JSON list of prompts.", str(path)) from None
            if not isinstance(data, list):
                raise DataError("expected a JSON list of prompts (strings or {\"prompt\", \"reference\"}).", str(path))
            entries = [(None, v) for v in data]
        for line, value in entries:
            case = _case_from(value, str(path), line)
            if case:
                cases.append(case)
    else:
        path = Run(run_dir).data_file("validation.jsonl")
        if not path.is_file():
            raise DataError("no validation split in this run. Fix: pass --prompts FILE (a JSON list of prompts).",
                            str(path))
        for line, value in _read_jsonl(path):
            if isinstance(value, dict) and isinstance(value.get("messages"), list):
                case = case_from_messages(value["messages"], str(path), line)
                if case:
                    cases.append(case)
    if not cases:
        raise DataError("no prompts to evaluate.", str(path))
    cases = distinct(cases)
    return cases[:limit] if limit else cases


def distinct(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each prompt once (the first reference kept): a repeated question would count twice in every metric."""
    seen: set[str] = set()
    out = []
    for case in cases:
        key = json.dumps([(m["role"], " ".join(m["content"].split())) for m in case["messages"]])
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def saved_result(run_dir: Path) -> dict[str, Any]:
    """The run's last evaluation (eval.json), or {} when it has none."""
    return read_json_object(Run(Path(run_dir)).eval_file)


# -- evaluate --------------------------------------------------------------------------------------


def evaluate(run_dir: str | Path, prompts_file: str | Path | None = None, settings: GenerationConfig | None = None,
             limit: int | None = 50, playground=None, loss_limit: int = LOSS_LIMIT, on_progress: ProgressFn | None = None,
             stop: threading.Event | None = None, k: int = RETRIEVE_K) -> dict[str, Any]:
    """Answer held-out prompts three ways (base + brand brief, + k retrieved examples, tuned), score them,
    write eval.json and eval.md.

    `playground` reuses an app's loaded model (a new one is loaded otherwise). `on_progress` hears
    (prompts done, prompts in all, what is happening) before and after each batch; setting `stop`
    ends it with `Stopped` and writes nothing. Returns {run, settings, rows: [{prompt, reference,
    base, retrieved, tuned}], metrics, phrases, three_way: {k, habit, added_prompt_tokens, sentence},
    elapsed_s}.
    """
    from tuner.playground import Playground

    if k < 1:
        raise TunerError(f"The retrieved column needs at least 1 example per question, got k={k}.")

    def tell(done: int, text: str) -> None:
        if stop is not None and stop.is_set():
            raise Stopped(STOPPED)
        if on_progress is not None:
            on_progress(done, len(cases), text)

    started = time.monotonic()
    settings = settings or GenerationConfig()
    pg = playground or Playground()
    info = pg.load_run(resolve(run_dir).path)
    run_dir = info.run_dir
    cases = load_cases(run_dir, prompts_file, limit)

    rows: list[dict[str, Any]] = []
    replies: dict[str, list] = {col: [] for col in COLUMNS}  # tuner.playground.Reply per row
    for start in range(0, len(cases), EVAL_BATCH):
        chunk = cases[start:start + EVAL_BATCH]
        first, last = start + 1, start + len(chunk)
        tell(start, f"Base, retrieved and tuned answer prompt{f's {first}-{last}' if last > first else f' {first}'} "
                    f"of {len(cases)}")
        got = pg.generate_replies([c["messages"] for c in chunk], [PLAYGROUND_COLUMN[c] for c in COLUMNS], settings,
                                  run=run_dir, stop=stop, k=k)
        if stop is not None and stop.is_set():  # a stopped batch lacks the columns it never reached
            raise Stopped(STOPPED)
        for case, reply in zip(chunk, got, strict=True):
            rows.append({"prompt": case["messages"][-1]["content"], "reference": case["reference"],
                         **{col: reply[PLAYGROUND_COLUMN[col]].text for col in COLUMNS}})
            for col in COLUMNS:
                replies[col].append(reply[PLAYGROUND_COLUMN[col]])
    tell(len(cases), f"All {len(cases)} prompts answered; measuring the losses (held-out replies, general English)")

    train_replies, _ = training_replies(Run(run_dir).data_file("train.jsonl"), limit=10_000)
    phrases = brand_phrases(train_replies)
    marker = habit_of(train_replies)
    metrics = column_metrics(rows, replies, phrases, marker)
    # metrics["memorisation"] (issue 26 item 2: copied spans, PII emitted, canaries) is added here by its own module

    # losses: the same model, adapter off and on
    losses = loss_metrics(pg, info, Run(run_dir).config().max_length, loss_limit)
    fingerprint = losses.pop("fingerprint", None)
    tell(len(cases), "Checking what the tuned model memorised (copied spans, personal data, planted canaries)")
    metrics[memorisation.METRIC].update(memorisation.measure(pg, run_dir, rows, phrases))
    tell(len(cases), "Writing eval.json and eval.md")
    for name, values in losses.items():
        metrics[name].update(values)

    result = {
        "run": info.run_id,
        "settings": asdict(settings),
        "prompts": str(prompts_file) if prompts_file else "validation split",
        "rows": rows,
        "metrics": metrics,
        "phrases": phrases,
        "three_way": three_way(metrics, marker, k, len(rows)),
        "losses": losses,
        "loss_fingerprint": fingerprint,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    Run(run_dir).eval_file.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    Run(run_dir).eval_report.write_text(to_markdown(result), encoding="utf-8")
    return result


def table_metrics(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The metrics with a value per column (the memorisation checks are a section of their own)."""
    return [(name, m) for name, m in metrics.items() if name != memorisation.METRIC]


def column_metrics(rows: list[dict[str, Any]], replies: dict[str, list], phrases: list[dict[str, Any]],
                   marker: Marker | None) -> dict[str, dict[str, Any]]:
    """Every column's scores: {metric: {explain, base, retrieved, tuned, reference}}. `replies[col]` holds
    tuner.playground.Reply objects (text, ended, prompt_tokens, seconds) in the order of `rows`."""
    refs = [r for r in rows if r["reference"] is not None]
    metrics: dict[str, dict[str, Any]] = {name: {"explain": text} for name, text in METRIC_HELP.items()}
    for col in COLUMNS:
        texts, ended = [r[col] for r in rows], [x.ended for x in replies[col]]
        counted = tally(texts, marker, ended) if marker is not None else None
        metrics["habit"][col] = {"count": counted.exact, "of": counted.prompts} if counted else None
        metrics["chrf"][col] = chrf([r[col] for r in refs], [r["reference"] for r in refs], marker) if refs else None
        metrics["degenerate"][col] = counted.degenerate if counted else degenerate_count(texts, ended)
        metrics["brand_phrase_rate"][col] = phrase_rate(texts, phrases)
        metrics["length_words"][col] = length_stats(texts)
        metrics["prompt_tokens"][col] = round(statistics.fmean(x.prompt_tokens for x in replies[col]), 1) \
            if replies[col] else None
        metrics["seconds_per_reply"][col] = round(statistics.fmean(x.seconds for x in replies[col]), 3) \
            if replies[col] else None
    if marker is not None and refs:
        counted = tally([r["reference"] for r in refs], marker)
        metrics["habit"]["reference"] = {"count": counted.exact, "of": counted.prompts}
    metrics["chrf"]["reference"] = 100.0 if refs else None
    metrics["brand_phrase_rate"]["reference"] = phrase_rate([r["reference"] for r in refs], phrases)
    metrics["length_words"]["reference"] = length_stats([r["reference"] for r in refs])
    return metrics


def degenerate_count(replies: Sequence[str], ended: Sequence[bool]) -> int:
    from tuner.verdict import degenerate

    return sum(degenerate(r, e) is not None for r, e in zip(replies, ended, strict=True))


def three_way(metrics: dict[str, dict[str, Any]], marker: Marker | None, k: int, prompts: int) -> dict[str, Any]:
    """The comparison's summary: k, the prompt tokens retrieval adds per reply, and which way to ship."""
    ways = {}
    for col in COLUMNS:
        habit, length = metrics["habit"].get(col), metrics["length_words"].get(col)
        ways[col] = Way(WAY_NAMES[col], prompts=prompts,
                        habit=habit["count"] if habit else None, degenerate=metrics["degenerate"][col],
                        chrf=metrics["chrf"][col], words=length["median"] if length else None,
                        seconds=metrics["seconds_per_reply"][col], prompt_tokens=metrics["prompt_tokens"][col])
    agents = metrics["length_words"].get("reference")
    what = f"the {marker.kind}" if marker is not None else "the habit"
    added = None
    if metrics["prompt_tokens"].get("retrieved") is not None and metrics["prompt_tokens"].get("base") is not None:
        added = round(metrics["prompt_tokens"]["retrieved"] - metrics["prompt_tokens"]["base"], 1)
    return {"k": k, "habit": marker.text if marker is not None else None, "added_prompt_tokens": added,
            "sentence": ship_sentence(ways["base"], ways["retrieved"], ways["tuned"], what,
                                      agents["median"] if agents else None)}


def cell_text(value: Any, markdown: bool = True) -> str:
    """A metric value or reply as a table cell: a length as "median (p10-p90)", a count as "n of N"; `markdown`
    escapes what would break a Markdown table row."""
    if value is None:
        return "—"
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:g} ({value['p10']:g}-{value['p90']:g})"
    if isinstance(value, dict) and "count" in value and "of" in value:
        return f"{value['count']} of {value['of']}"
    if isinstance(value, dict):  # a metric of another shape: its parts, named
        return ", ".join(f"{k.replace('_', ' ')} {cell_text(v, markdown)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") if markdown else text


_cell = cell_text


def to_markdown(result: dict[str, Any]) -> str:
    """A readable report: which way to ship, metrics table, mined phrases, then every prompt with its replies."""
    s = result["settings"]
    three = result.get("three_way") or {}
    lines = [f"# Evaluation of run {result['run']}", "",
             f"Prompts: {result['prompts']} ({len(result['rows'])}). Same settings for every column: "
             f"temperature {s['temperature']}, top-p {s['top_p']}, max new tokens {s['max_new_tokens']}, "
             f"seed {s['seed']}, repetition penalty {s['repetition_penalty']}.", ""]
    if three:
        lines += [f"**{three['sentence']}.**", "",
                  f"Columns: base + brand brief (prompting); the same shown the {three['k']} training conversations "
                  f"most like each question (retrieval, {_cell(three['added_prompt_tokens'])} more prompt tokens a "
                  f"reply); the tuned model.", ""]
    lines += ["## Metrics", "", "| metric | " + " | ".join(COLUMN_LABELS[c] for c in COLUMNS)
              + " | reference | what it means |", "|---|---|---|---|---|---|"]
    for name, m in table_metrics(result["metrics"]):
        lines.append(f"| {name} | " + " | ".join(_cell(m.get(c)) for c in COLUMNS)
                     + f" | {_cell(m.get('reference'))} | {_cell(m.get('explain'))} |")
    memorised = result["metrics"].get(memorisation.METRIC)
    if memorised and memorised.get("sentence"):
        lines += ["", "## What the tuned model memorised", "", memorisation.markdown(memorised)]
    lines += ["", "## Brand phrases (mined from the training replies)", ""]
    lines += [f"- \"{p['phrase']}\" ({p['position']}, {p['share']:.0%} of training replies)" for p in result["phrases"]]
    if not result["phrases"]:
        lines.append("None found: no opening or sign-off recurs in a quarter of the replies.")
    lines += ["", "## Replies", "", "| # | prompt | reference | " + " | ".join(COLUMN_LABELS[c] for c in COLUMNS) + " |",
              "|---|---|---|---|---|---|"]
    for i, row in enumerate(result["rows"], 1):
        lines.append(f"| {i} | {_cell(row['prompt'])} | {_cell(row['reference'])} | "
                     + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# -- CLI ------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="Run id, or path to a run folder.")
    parser.add_argument("--prompts", default=None,
                        help="JSON list of prompts (strings or {prompt, reference}) or JSONL; default: the validation split.")
    parser.add_argument("--limit", type=int, default=50, help="Evaluate at most N prompts (0: all).")
    parser.add_argument("--examples", type=int, default=RETRIEVE_K, metavar="K",
                        help=f"Training conversations shown to the retrieved column per question (default {RETRIEVE_K}).")
    parser.add_argument("--json", action="store_true", help="Print {rows, metrics, phrases, three_way} as JSON.")
    add_config_arguments(parser.add_argument_group("generation settings (every GenerationConfig field)"),
                         GenerationConfig)


def cli(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise TunerError("--limit must be 0 (all) or more.")
    if args.examples < 1:
        raise TunerError(f"--examples must be 1 or more (training conversations per question), got {args.examples}.")
    settings = GenerationConfig(**config_overrides(args, GenerationConfig))
    result = evaluate(args.run, args.prompts, settings, limit=args.limit or None, k=args.examples)
    if args.json:
        print(json.dumps({key: result[key] for key in ("rows", "metrics", "phrases", "three_way")},
                         indent=2, ensure_ascii=False))
        return 0
    heads = [*(COLUMN_LABELS[c] for c in COLUMNS), "reference"]
    print(f"{'metric':<20}" + "".join(f"{h:>21}" for h in heads))
    for name, m in table_metrics(result["metrics"]):
        print(f"{name:<20}" + "".join(f"{_cell(m.get(c)):>21}" for c in (*COLUMNS, "reference")))
    three = result["three_way"]
    print(f"\n{three['sentence']}.\nRetrieval showed {three['k']} training conversations per question "
          f"({_cell(three['added_prompt_tokens'])} more prompt tokens a reply).")
    if (result["metrics"].get(memorisation.METRIC) or {}).get("sentence"):
        print(f"Memorised: {result['metrics'][memorisation.METRIC]['sentence']}.")
    print(f"{len(result['rows'])} prompts; replies side by side in eval.md and eval.json in the run folder.")
    return 0
