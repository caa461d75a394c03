"""Does the run speak like the brand? Greedy replies to held-out prompts, graded by tuner.verdict.

The brand's habit is read from its own training replies (a sign-off or an opening that at least
half of them share, tuner.voice.brand_phrases). During training, each evaluation also asks the
model a few held-out prompts and scores how many replies carry the habit, so the checkpoint kept
as "best" (and early stopping) follows the voice, with the validation loss as the tie-break. At
the end the result and the base answer the same held-out prompts, and the verdict goes into the
run's status and model card in words with numbers. Held-out prompts occur nowhere in training.
Besides the habit, the verdict says how close the result's and the base's replies are to the
agents' own replies to the same questions (chrF), so a model that learned only the sign-off is
not praised for it.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from tuner import replycache
from tuner.config import GenerationConfig
from tuner.evaluate import chrf, general_texts, mean_losses, text_sequences
from tuner.runs import is_main_process, update_status
from tuner.templates import end_of_turn_token
from tuner.train.callbacks import from_rank0
from tuner.verdict import CHECK_PROMPTS, Marker, Tally, tally, verdict_sentence  # noqa: F401  (CHECK_PROMPTS: the trainer takes it here)
from tuner.voice import HABIT_SHARE, habit_of  # noqa: F401  (habit_of: where the trainer and the GGUF check find it)

METRIC = "voice"  # the metric name in the Trainer (eval_voice): higher is better
LOSS_WEIGHT = 0.01  # the loss breaks ties between equal voice scores; one prompt (1/8) outweighs it


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def held_out_prompts(train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]], limit: int,
                     seed: int, also_seen: list[str] = ()) -> list[list[dict[str, Any]]]:
    """Opening turns of validation conversations (system + first user message) whose user text occurs
    nowhere in the training data (nor in `also_seen`), each once, a seeded sample of at most `limit`."""
    seen = {_norm(m["content"]) for r in train_rows for m in r["messages"] if m["role"] == "user"}
    seen |= {_norm(text) for text in also_seen}
    prompts, keys = [], set()
    for row in val_rows:
        msgs = row["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first is None or not any(m["role"] == "assistant" for m in msgs[first:]):
            continue
        key = _norm(msgs[first]["content"])
        if not key or key in seen or key in keys:
            continue
        keys.add(key)
        prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs[:first + 1]])
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def held_out_references(prompts: list[list[dict[str, Any]]], val_rows: list[dict[str, Any]]) -> list[str | None]:
    """The agents' reply to each held-out prompt (the first assistant turn after its user message in the validation
    conversation it came from), or None for a prompt found in no validation conversation."""
    replies: dict[str, str] = {}
    for row in val_rows:
        msgs = row["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        reply = next((m["content"] for m in msgs[first + 1:] if m["role"] == "assistant"), None) \
            if first is not None else None
        if reply is not None:
            replies.setdefault(_norm(msgs[first]["content"]), reply)
    return [replies.get(_norm(p[-1]["content"])) for p in prompts]


def closeness(tuned: list[str], base: list[str] | None, references: list[str | None] | None,
              marker: Marker | None = None) -> dict[str, Any] | None:
    """chrF of the result's and the base's replies against the agents' replies, over the prompts that have one,
    the habit `marker` taken out of all three (see tuner.evaluate.chrf)."""
    if base is None or not references:
        return None
    keep = [i for i, ref in enumerate(references) if ref is not None]
    if not keep:
        return None
    refs = [references[i] for i in keep]
    return {"tuned": chrf([tuned[i] for i in keep], refs, marker), "base": chrf([base[i] for i in keep], refs, marker),
            "references": len(keep)}


def reply_budget(tokenizer, replies: list[str]) -> int:
    """New tokens a reply may take: the longest typical agent reply (90th percentile) and room to end it."""
    lengths = sorted(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies[:500]) or [64]
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    return max(32, min(int(p90 * 1.5) + 16, GenerationConfig().max_new_tokens))


def autocast(model):
    """The half precision the run trained in, for inference on the same weights (fp32 adapters, half base)."""
    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    return torch.autocast(model.device.type, dtype=half) if half is not None else contextlib.nullcontext()


def end_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eot = end_of_turn_token(tokenizer)  # the template's own end of a reply, if generation_config misses it
    if eot is not None and isinstance(tokenizer.convert_tokens_to_ids(eot), int):
        ids.add(tokenizer.convert_tokens_to_ids(eot))
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, chat_template: str, prompts: list[list[dict[str, Any]]], max_new_tokens: int,
             batch_size: int = 8, adapter_names: list[str] | None = None,
             prefixes: list[str] | None = None) -> tuple[list[str], list[bool]]:
    """Greedy replies (the playground's default: temperature 0) and whether each ended its turn.
    `adapter_names`, one per prompt: peft's mixed batches ("__base__" = adapter off for that row). `prefixes`, one
    per prompt: the reply's start, given (teacher-forced); what comes back is its greedy continuation."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = end_ids(model, tokenizer)
    penalty = GenerationConfig().repetition_penalty
    replies, ended = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, chat_template=chat_template, tokenize=False,
                                                   add_generation_prompt=True) for p in prompts[start:start + batch_size]]
            if prefixes:
                texts = [t + pre for t, pre in zip(texts, prefixes[start:start + batch_size], strict=True)]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            mixed = {"adapter_names": adapter_names[start:start + batch_size]} if adapter_names else {}
            with autocast(model):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id, repetition_penalty=penalty, **mixed)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                stop_at = next((i for i, t in enumerate(row) if t in stops), None)
                ended.append(stop_at is not None)
                replies.append(tokenizer.decode(row[:stop_at], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies, ended


def _tally_dict(t: Tally) -> dict[str, int]:
    return {"prompts": t.prompts, "exact": t.exact, "near": t.near, "looped": t.looped, "unended": t.unended,
            "empty": t.empty}


class VoiceCheck(TrainerCallback):
    """At each evaluation: a few held-out prompts, greedy, scored for the habit; adds `eval_voice` to the
    metrics (the share with the habit exactly, less the share that looped, never ended or said nothing, less a
    hundredth of the loss), which SFTConfig makes the best-model and early-stopping metric.
    Comes before OverheadBudget, which saves new bests by this metric, and after RunRecorder."""

    def __init__(self, run_dir, marker: Marker, prompts: list[list[dict[str, Any]]], chat_template: str,
                 max_new_tokens: int):
        self.run_dir, self.marker, self.prompts = run_dir, marker, prompts
        self.chat_template, self.max_new_tokens = chat_template, max_new_tokens
        self.history: list[dict[str, Any]] = []

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kw):
        if metrics is None or "eval_loss" not in metrics or model is None:
            return
        # nothing to choose between, so no replies to generate: at step 0 (the base, never a checkpoint;
        # the final verdict asks the base) and at the last step when no evaluation came before it
        if state.global_step == 0 or (state.best_metric is None and state.global_step >= state.max_steps):
            metrics[f"eval_{METRIC}"] = -LOSS_WEIGHT * float(metrics["eval_loss"])
            return
        score = None
        if is_main_process():  # rank 0 asks; a launch's other processes take its score (the same best checkpoint)
            started = time.monotonic()
            replies, ended = generate(model, processing_class, self.chat_template, self.prompts, self.max_new_tokens)
            t = tally(replies, self.marker, ended)
            score = (t.exact - t.degenerate) / max(t.prompts, 1) - LOSS_WEIGHT * float(metrics["eval_loss"])
            self.history.append({"step": state.global_step, **_tally_dict(t),
                                 "seconds": round(time.monotonic() - started, 1)})
            update_status(self.run_dir, voice_checks=self.history)
        metrics[f"eval_{METRIC}"] = from_rank0(score)


def served_model(model, base_model: str, trained_quantization: str, dev: str):
    """A model in memory as the playground would serve it: the same adapter weights on the base the playground
    loads (on a CPU a 16/32-bit base for an adapter trained on NF4; tuner.precision.serving_dtype)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from tuner.models import load_model
    from tuner.playground import serving_quantization
    from tuner.precision import serving_dtype

    served, dtype = serving_quantization(trained_quantization, dev), serving_dtype(dev)
    if not hasattr(model, "peft_config") or (
            served == trained_quantization and (served != "none" or model.get_input_embeddings().weight.dtype == dtype)):
        return model
    copy = get_peft_model(load_model(base_model, quantization=served, dtype=dtype, dev=dev),
                          model.peft_config["default"])
    set_peft_model_state_dict(copy, get_peft_model_state_dict(model))
    return copy.eval()


def general_perplexity(model, tokenizer, fast: bool = False) -> float | None:
    """Perplexity of the shipped general paragraphs; `fast`: in bf16 (on a CPU whose probe measured bf16
    faster) even for 16/32-bit weights, since only the ratio of tuned to base, both scored alike, is reported."""
    return general_perplexities(model, tokenizer, fast)[0]


def general_perplexities(model, tokenizer, fast: bool = False,
                         set_aside: Sequence[int] = ()) -> tuple[float | None, float | None]:
    """general_perplexity, and the same with the tokens `set_aside` (the end of turn) left out of every prediction
    (tuner.evaluate.mean_losses), from one pass."""
    half = fast and model.device.type == "cpu" and not any(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16) if half else autocast(model):
        losses = mean_losses(model, text_sequences(tokenizer, general_texts()), tokenizer.pad_token_id or 0,
                             set_aside=set_aside)
    return tuple(math.exp(x) if x is not None else None for x in losses)


def _no_verdict(marker: Marker | None, prompts: list) -> dict[str, Any] | None:
    if marker is None:
        return {"sentence": "No phrase recurs in most of your agents' replies, so there is no habit to check "
                            "automatically: compare replies in the playground.", "marker": None}
    if not prompts:
        return {"sentence": "No validation conversation asks something new (every prompt also occurs in the "
                            "training data), so the voice was not checked.", "marker": marker.text}
    return None


def _graded(marker: Marker, prompts: list[list[dict[str, Any]]], tuned_replies: list[str], tuned_ended: list[bool],
            base_replies: list[str] | None, base_ended: list[bool] | None, tuned_ppl: float | None,
            base_ppl: float | None, references: list[str | None] | None = None) -> dict[str, Any]:
    """The verdict, with the numbers, from the replies of the result and (if asked) the base, and the agents'
    replies to the same prompts (`references`, None where a prompt has none) for closeness."""
    tuned = tally(tuned_replies, marker, tuned_ended)
    base = tally(base_replies, marker, base_ended) if base_replies is not None else None
    change = tuned_ppl / base_ppl - 1 if tuned_ppl and base_ppl else None
    close = closeness(tuned_replies, base_replies, references, marker)
    return {
        "sentence": verdict_sentence(marker, tuned, base, change,
                                     (close["tuned"], close["base"]) if close else None),
        "marker": marker.text, "kind": marker.kind, "tuned": _tally_dict(tuned),
        "base": _tally_dict(base) if base is not None else None,
        "chrf": close,
        "general_perplexity": {"base": round(base_ppl, 3) if base_ppl else None,
                               "tuned": round(tuned_ppl, 3) if tuned_ppl else None},
        "general_perplexity_change": round(change, 4) if change is not None else None,
        "examples": [{"prompt": p[-1]["content"], "base": base_replies[i] if base_replies else None, "tuned": r}
                     for i, (p, r) in enumerate(zip(prompts[:5], tuned_replies, strict=False))],
    }


def model_verdict(model, tokenizer, chat_template: str, marker: Marker | None,
                  prompts: list[list[dict[str, Any]]], max_new_tokens: int, fast_perplexity: bool = False,
                  references: list[str | None] | None = None) -> dict[str, Any]:
    """The verdict of a model in memory (a preference child before it is saved): the result and the base
    (adapter off) answer the held-out prompts in one mixed batch. A saved run is graded as the playground
    serves it instead (final_verdict). `references`: the agents' replies to the prompts (held_out_references)."""
    if (none := _no_verdict(marker, prompts)) is not None:
        return none
    base_ppl, base_replies, base_ended = None, None, None
    if hasattr(model, "disable_adapter"):
        names = [name for _ in prompts for name in (model.active_adapter, "__base__")]
        both, ended = generate(model, tokenizer, chat_template, [p for p in prompts for _ in (0, 1)],
                               max_new_tokens, batch_size=16, adapter_names=names)
        tuned_replies, tuned_ended, base_replies, base_ended = both[0::2], ended[0::2], both[1::2], ended[1::2]
        with model.disable_adapter():
            base_ppl = general_perplexity(model, tokenizer, fast_perplexity)
    else:
        tuned_replies, tuned_ended = generate(model, tokenizer, chat_template, prompts, max_new_tokens)
    tuned_ppl = general_perplexity(model, tokenizer, fast_perplexity)
    return _graded(marker, prompts, tuned_replies, tuned_ended, base_replies, base_ended, tuned_ppl, base_ppl,
                   references)


def base_cache_key(pg, run, prompts: list[list[dict[str, Any]]], settings: GenerationConfig) -> str:
    """tuner.replycache's key for the base's replies to `prompts` as the playground `pg` serves `run`'s base."""
    from dataclasses import asdict
    from importlib.metadata import version

    from tuner.models import resolve_model
    from tuner.playground import BASE

    info = pg.load_run(run)
    texts = pg.prompt_texts(prompts, BASE, settings, run)
    weights = pg.model.get_input_embeddings().weight
    return replycache.cache_key(
        resolve_model(info.base_model), texts,
        {**asdict(settings), "end_ids": pg.end_of_turn_ids, "quantization": pg.base_key[1] if pg.base_key else None},
        str(weights.dtype).removeprefix("torch."), pg.device,
        {pkg: version(pkg) for pkg in ("torch", "transformers", "peft")})


def final_verdict(pg, run, marker: Marker | None, prompts: list[list[dict[str, Any]]], max_new_tokens: int,
                  fast_perplexity: bool = False, references: list[str | None] | None = None) -> dict[str, Any]:
    """The result and the base answer the held-out prompts exactly as the playground `pg` serves `run` (its
    weights' dtype, its generation code, greedy); the verdict, with the numbers.

    The base's replies and general-text perplexity come from tuner.replycache when an earlier run on this
    machine asked the same base the same prompts under the same settings: then only the result answers.
    Otherwise both answer in one batch (a row per model, as the playground's compare) and the base's part
    is kept. `fast_perplexity`: score general text in bf16 (see general_perplexity). `references`: the agents'
    replies to the prompts; None reads them from the run's validation split (held_out_references). The returned
    dict's `timing` says what was decoded and how long it took."""
    from tuner.playground import BASE, TUNED

    if (none := _no_verdict(marker, prompts)) is not None:
        return none
    assert marker is not None
    settings = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    started = time.monotonic()
    key = base_cache_key(pg, run, prompts, settings)
    cached = replycache.read(key)
    got = pg.answers(prompts, [TUNED] if cached else [TUNED, BASE], settings, run)
    tuned_replies, tuned_ended = got[TUNED]
    base_replies, base_ended = (cached["replies"], cached["ended"]) if cached else got[BASE]
    decode_s = time.monotonic() - started
    ppl_key = "general_perplexity_bf16" if fast_perplexity else "general_perplexity"
    base_ppl = (cached or {}).get(ppl_key)
    if base_ppl is None:
        with pg.column_model(BASE, run) as model:
            base_ppl = general_perplexity(model, pg.tokenizer, fast_perplexity)
        replycache.write(key, {**(cached or {}), "replies": base_replies, "ended": base_ended, ppl_key: base_ppl})
    with pg.column_model(TUNED, run) as model:
        tuned_ppl = general_perplexity(model, pg.tokenizer, fast_perplexity)
    if references is None:
        references = run_references(pg.load_run(run).run_dir, prompts)
    verdict = _graded(marker, prompts, tuned_replies, tuned_ended, base_replies, base_ended, tuned_ppl, base_ppl,
                      references)
    verdict["timing"] = {"base_replies": "cached" if cached else "decoded", "rows_decoded": len(prompts) * len(got),
                         "decode_s": round(decode_s, 2), "total_s": round(time.monotonic() - started, 2),
                         "cache_key": key}
    return verdict


def run_references(run_dir, prompts: list[list[dict[str, Any]]]) -> list[str | None]:
    """held_out_references from a run folder's validation split (none when the run has no such file)."""
    from tuner.messages import read_examples
    from tuner.runs import Run

    val_file = Run(run_dir).data_file("validation.jsonl")
    return held_out_references(prompts, read_examples(val_file)) if val_file.is_file() else [None] * len(prompts)
