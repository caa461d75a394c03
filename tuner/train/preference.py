"""Preference tuning: a finished SFT run + reviewers' pairs -> a child run trained with DPO (or KTO on thumbs).

The child is a run folder like any other (tuner.runs): config.yaml is the parent's TrainConfig (same base,
same 4-bit storage, same LoRA shape), data/ holds the parent's examples plus the preference pairs, and
status.json names the parent and holds the PreferenceConfig. Training starts from the parent's adapter
(trainable); trl keeps a frozen copy of it as the reference ("ref" adapter), so the child is pulled only
as far from its parent as beta allows. Before and after, the held-out pairs (a seeded split) are scored:

    reward(y) = beta * (log p_model(y | prompt) - log p_base(y | prompt))
    preference accuracy = share of held-out pairs where reward(chosen) > reward(rejected)
    reward margin       = mean of reward(chosen) - reward(rejected)

with the base (adapter off) as the common reference, so the parent ("before") and the child ("after")
are measured on one scale. The parent's voice and forgetting check then runs on the child.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from datasets import Dataset, disable_progress_bars
from tuner import __version__, edits, feedback
from tuner.config import Method, PreferenceConfig, TrainConfig
from tuner.edits import is_paired, settings_for_edit
from tuner.errors import DataError, TrainingError, TunerError
from tuner.messages import read_examples, read_jsonl, write_jsonl
from tuner.models import DEFAULT_HUB_ID, device, is_default, load_model, load_tokenizer
from tuner.runs import (
    Run,
    check_data,
    checkpoint_step,
    complete_checkpoints,
    is_main_process,
    machine_lock,
    prepare_run,
    read_json,
    read_status,
    remove_incomplete_checkpoints,
    resolve,
    sha256_file,
    truncate_metrics,
    update_status,
    write_json_atomic,
)
from tuner.train.callbacks import OverheadBudget, RunRecorder
from tuner.train.checkpoints import offset_from
from tuner.train.editspan import EditWeightedDPOTrainer
from tuner.train.recipe import attention, precision, quantization
from tuner.train.result import save_result
from tuner.train.run import is_oom, peak_memory_mb, proc_start, release_memory
from tuner.train.trainer import keep_4bit_layout_trainable, training_context
from tuner.train.voicecheck import (
    autocast,
    end_ids,
    general_perplexities,
    generate,
    habit_of,
    held_out_prompts,
    held_out_references,
    model_verdict,
    reply_budget,
    served_model,
)

METHODS = ("dpo", "kto")
BEHAVIOUR_PROMPTS = 24  # new prompts (outside the pairs and the training data) asked of parent and child
GENERAL_RISE = 0.10  # a child may lose at most this much general-text perplexity on its parent's (the target)
NEXT_WORDS_TOKENS = 8  # the parent's continuation read where the child says a replaced word (edits.term_sites)


def is_preference_run(run_dir: str | Path) -> bool:
    """Whether a run folder is a preference run (its status names a parent and holds a PreferenceConfig)."""
    return isinstance(read_status(run_dir).get("preference"), dict)


# -- preparing the child run ----------------------------------------------------------------------


def preference_rows(parent: Run, pcfg: PreferenceConfig, prefs: str | Path | None) -> list[dict[str, Any]]:
    """The rows to train on: pairs from the file (dpo, or kto, which learns from them as thumbs) or the parent's
    feedback (dpo), or the parent's thumbs (kto without a file)."""
    if prefs is not None:  # pairs; KTO learns from them as thumbs (trl unpairs them: chosen up, rejected down)
        found = feedback.read_pairs(prefs)
        found.raise_errors()
        rows = feedback.strip_lines(found.rows)
        where = str(prefs)
    elif pcfg.method == "dpo":
        rows, where = feedback.pairs(parent), f"the feedback on {parent.id}"
    else:
        rows, where = feedback.unpaired(parent), f"the thumbs on {parent.id}"
    paired = prefs is not None or pcfg.method == "dpo"
    if paired and len(rows) < feedback.MIN_PAIRS:
        need = feedback.pairs_needed(len(rows))
        thumbs = len(feedback.unpaired(parent)) if prefs is None else 0
        hint = f" Or train on its {thumbs} thumbs with --method kto." if thumbs >= feedback.MIN_PAIRS else ""
        raise TrainingError(f"In {where}: {need}{hint}")
    if not paired and len(rows) < feedback.MIN_PAIRS:
        raise TrainingError(f"In {where}: {len(rows)} thumbs so far; KTO needs at least {feedback.MIN_PAIRS}: "
                            f"{feedback.MIN_PAIRS - len(rows)} more (thumbs up or down on replies).")
    return rows


def prepare_preference_run(parent: str | Path, pcfg: PreferenceConfig, prefs: str | Path | None = None,
                           run_dir: str | Path | None = None, owner: dict[str, Any] | None = None,
                           given: set[str] | None = None) -> Path:
    """Create the child run folder (status 'queued'): the parent's config and data, the preference rows
    hashed with them, the lineage, and its owner (who trains it; tuner.runs.prepare_run). The settings the user
    did not set follow the pairs' edit where one was measured (settings_for_edit; `given` as there). Raises
    TunerError when there is too little to learn from."""
    parent_run = resolve(parent)
    state = parent_run.status()
    if state.get("status") != "completed" or not parent_run.adapter_dir.is_dir():
        raise TrainingError(f"{parent_run.id} has no finished adapter (status {state.get('status')}). "
                            "Fix: preference tuning starts from a completed LoRA run.")
    if is_preference_run(parent_run.path):
        lineage = list(state.get("lineage") or [parent_run.id])
    else:
        lineage = [str((parent_run.sources().get("train.jsonl") or {}).get("source", "data")), parent_run.id]
    cfg = parent_run.config()
    if cfg.method is not Method.LORA:
        raise TrainingError(f"{parent_run.id} is a full fine-tune; preference tuning trains a LoRA adapter on "
                            "a LoRA run. Fix: pick a LoRA run.")
    rows = preference_rows(parent_run, pcfg, prefs)
    pcfg, for_edit = settings_for_edit(pcfg, rows, given)
    child = Run(prepare_run(cfg, parent_run.data_dir, run_dir, owner=owner))
    if not is_main_process():
        return child.path
    path = child.preferences_file
    write_jsonl(path, rows)
    sources = child.sources()
    sources[child.preferences_file.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "examples": len(rows),
                                    "source": str(Path(prefs).resolve()) if prefs else str(parent_run.feedback_file)}
    write_json_atomic(child.sources_file, sources)
    update_status(child.path, method=pcfg.method, preference=pcfg.to_dict(), parent=parent_run.id,
                  parent_dir=str(parent_run.path), lineage=[*lineage, child.id], preference_rows=len(rows),
                  edit_settings=for_edit)
    return child.path


# -- scoring --------------------------------------------------------------------------------------


@torch.no_grad()
def completion_logps(model, tokenizer, rows: list[dict[str, Any]], key: str, max_length: int) -> list[float]:
    """Sum of log-probabilities of each row's `key` reply given its prompt (the model's own chat template)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for row in rows:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            start = next((i for i, (a, b) in enumerate(zip(p_ids, ids, strict=False)) if a != b), len(p_ids))
            cut = max(len(ids) - max_length, 0)  # keep the reply: truncate the prompt from the left
            ids, start = ids[cut:], max(start - cut, 1)
            x = torch.tensor([ids], device=model.device)
            with autocast(model):
                logits = model(input_ids=x).logits[0, start - 1:-1].float()
            target = x[0, start:]
            out.append(float(torch.log_softmax(logits, -1).gather(1, target[:, None]).sum()))
    finally:
        model.train(was_training)
    return out


def preference_scores(policy: dict[str, list[float]], base: dict[str, list[float]], beta: float) -> dict[str, Any]:
    """Preference accuracy and reward margin from log-probabilities of chosen/rejected under a model and the base."""
    rewards = [(beta * (pc - bc), beta * (pr - br)) for pc, pr, bc, br in
               zip(policy["chosen"], policy["rejected"], base["chosen"], base["rejected"], strict=True)]
    n = len(rewards)
    if not n:
        return {"pairs": 0, "accuracy": None, "margin": None, "interval": None}
    wins = sum(c > r for c, r in rewards)
    return {"pairs": n, "accuracy": round(wins / n, 4), "margin": round(sum(c - r for c, r in rewards) / n, 4),
            "interval": [round(x, 4) for x in feedback.wilson(wins, n)]}


def behaviour_prompts(sft_train: list[dict[str, Any]], sft_val: list[dict[str, Any]], pairs: list[dict[str, Any]],
                      limit: int, seed: int) -> list[list[dict[str, Any]]]:
    """Opening turns of validation conversations whose question is in no pair and nowhere in training."""
    in_pairs = [m["content"] for p in pairs for m in p["prompt"] if m["role"] == "user"]
    return held_out_prompts(sft_train, sft_val, limit, seed, also_seen=in_pairs)


def behaviour_check(rows: list[dict[str, Any]], method: str, parent: tuple[list[str], list[bool]],
                    child: tuple[list[str], list[bool]],
                    parent_next: Callable[[list[tuple[int, str]]], list[str]] | None = None,
                    general: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
    """What the reviewers changed (tuner.edits) and how often parent and child show it on new questions; the
    sentence the result leads with, which says when the run did not learn it. `parent_next(sites)`: the parent's
    greedy continuation of each (new question's index, the child's reply up to a replaced word) site, which tells a
    replaced word put where the parent had one to replace from one put where it had none (overuse). `general`:
    {"parent"|"child": {"ppl", "without_end_of_turn"}}, general-text perplexity (general_text): a child whose edit
    shows but who lost more than GENERAL_RISE of it against the parent has not learned the edit as asked."""
    found = edits.changes(rows) if is_paired(rows) else []
    if not parent[0]:
        return {"sentence": "No validation question is outside the pairs and the training data, so the change "
                            "was not measured on new questions: compare parent and child in the playground.",
                "changes": [], "learned": None}
    if not found:
        why = ("KTO learns from thumbs, which show no edit to look for" if not is_paired(rows) else
               f"no edit is shared by {edits.MIN_SHARE:.0%} of the pairs")
        return {"sentence": f"{why.capitalize()}, so no change was measured on new questions: compare parent and "
                            "child in the playground.", "changes": [], "learned": None}
    def next_words(change: edits.Change) -> list[str] | None:
        if parent_next is None or change.kind != "replaced":
            return None
        sites = edits.term_sites(change, child[0])
        return parent_next(sites) if sites else []

    measured = [edits.behaviour(c, parent[0], child[0], parent[1], child[1], next_words(c)) for c in found]
    lead = measured[0]
    n, shown = lead["child"]["prompts"], lead["child"]["shown"]
    needed = lead["child"].get("needed", n)  # a replaced word counts where a reply says either word
    bad = lead["child"]["looped"] + lead["child"]["unended"] + lead["child"].get("empty", 0)
    # a house term said where the parent had nothing to replace is overuse, not the edit: at most the share
    # a reply may miss the edit (10%) of those replies
    overused = bool(lead["unasked"]) and lead["unasked"] > (1 - edits.LEARNED_SHARE) * lead["unasked_of"]
    stock = lead["child"].get("repeated", 0) >= edits.STOCK_SHARE * n > lead["parent"].get("repeated", 0)
    shows = (needed > 0 and shown >= edits.LEARNED_SHARE * needed and bad <= edits.DEGENERATE_SHARE * n
             and not overused and not stock)
    rise, clause = general_rise(general)
    lost = rise is not None and rise > GENERAL_RISE
    learned = shows and not lost
    if learned:
        sentence = f"The reviewers' edit took: {lead['sentence']}{clause}"
    elif shows:
        sentence = (f"The reviewers' edit shows, but the child lost general text: {lead['sentence']}{clause}, over "
                    f"the {GENERAL_RISE:+.0%} a run may lose")
    else:
        sentence = (f"The reviewers' edit did not take: {lead['sentence']}{clause} (learned means at least "
                    f"{edits.LEARNED_SHARE:.0%} of the new replies it applies to, at most "
                    f"{edits.DEGENERATE_SHARE:.0%} degenerate, fewer than {edits.STOCK_SHARE:.0%} the same reply "
                    f"as another question's"
                    + (f", a replaced word put where the parent had nothing to replace in at most "
                       f"{1 - edits.LEARNED_SHARE:.0%} of the replies that say it" if lead["unasked"] is not None
                       else "")
                    + (f", and general-text perplexity at most {GENERAL_RISE:+.0%} on the parent's)"
                       if rise is not None else ")"))
    if n < feedback.FEW_HELD_OUT:
        sentence += f"; {n} new questions are a rough measure (fewer than {feedback.FEW_HELD_OUT})"
    sentence += "."
    return {"sentence": sentence, "changes": measured, "learned": learned}


def general_rise(general: dict[str, dict[str, float | None]] | None) -> tuple[float | None, str]:
    """The child's general-text perplexity against the parent's, as a share, and the clause that says it (with the
    end of turn set aside too, where that tells another story: a child taught to stop after a sentence puts its
    probability there)."""
    if not general or not general["parent"].get("ppl") or not general["child"].get("ppl"):
        return None, ""
    rise = general["child"]["ppl"] / general["parent"]["ppl"] - 1
    clause = f"; general-text perplexity {rise:+.1%} on the parent's"
    p_without, c_without = general["parent"].get("without_end_of_turn"), general["child"].get("without_end_of_turn")
    if p_without and c_without and abs(c_without / p_without - 1 - rise) >= 0.02:
        clause += f" ({c_without / p_without - 1:+.1%} with the end of turn set aside)"
    return rise, clause


def general_text(served, tokenizer, adapter: str, fast: bool = False) -> dict[str, float | None]:
    """General-text perplexity of `served` with `adapter` active, and the same with the end of turn set aside;
    `fast` as in tuner.train.voicecheck.general_perplexity (parent and child are scored alike)."""
    served.set_adapter(adapter)
    try:
        ppl, without = general_perplexities(served, tokenizer, fast, set_aside=end_ids(served, tokenizer))
    finally:
        served.set_adapter("default")
    return {"ppl": round(ppl, 4) if ppl else None, "without_end_of_turn": round(without, 4) if without else None}


@contextlib.contextmanager
def parent_beside(served, parent_adapter: Path) -> Iterator[None]:
    """The parent's adapter loaded beside the child's ("default") as "parent", for mixed batches, then removed."""
    served.load_adapter(str(parent_adapter), adapter_name="parent")
    try:
        yield
    finally:
        served.delete_adapter("parent")


def parent_and_child_replies(served, tokenizer, chat_template: str, prompts: list[list[dict[str, Any]]], budget: int
                             ) -> tuple[tuple[list[str], list[bool]], tuple[list[str], list[bool]]]:
    """Greedy replies to `prompts` from the parent ("parent", parent_beside) and the child ("default"), both on the
    model the playground serves (tuner.train.voicecheck.served_model: on a CPU the 16/32-bit base, not the 4-bit
    one the child trained on, whose greedy replies differ), in the same mixed batches, so the behaviour the
    result reports is what a user sees in the playground."""
    if not prompts:
        return ([], []), ([], [])
    both, ended = generate(served, tokenizer, chat_template, [p for p in prompts for _ in (0, 1)], budget,
                           batch_size=16, adapter_names=["parent", "default"] * len(prompts))
    return (both[0::2], ended[0::2]), (both[1::2], ended[1::2])


def _logps(model, tokenizer, rows, max_length) -> dict[str, list[float]]:
    return {k: completion_logps(model, tokenizer, rows, k, max_length) for k in ("chosen", "rejected")}


# -- training -------------------------------------------------------------------------------------


def train_preference(run_dir: str | Path, resume: bool = False,
                     progress: Callable[[dict[str, Any]], None] | None = None,
                     callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train a prepared preference run in this process; returns its final status (like train_run: a failure
    becomes status 'failed' with the reason; TunerError only when it cannot start)."""
    run_dir = resolve(Path(run_dir) if Path(run_dir).is_dir() else run_dir).path
    status = read_status(run_dir)
    if not is_preference_run(run_dir):
        raise TrainingError(f"{run_dir.name} is not a preference run. Fix: create one with "
                            "`python -m tuner train --method dpo --from RUN`.")
    if status.get("status") == "completed":
        raise TrainingError(f"{run_dir.name} is already completed; its result is in {status.get('adapter')}.")
    if resume and not complete_checkpoints(run_dir):
        resume = False
    with machine_lock(run_dir):
        started = time.monotonic()
        update_status(run_dir, status="running", error=None, pid=os.getpid(), pid_started=proc_start(os.getpid()),
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        dev = "cpu"
        try:
            dev = device()
            return _train(run_dir, resume, progress, dev, callbacks or [])
        except KeyboardInterrupt:
            return update_status(run_dir, status="cancelled", error="Stopped from the keyboard. Resume to continue.",
                                 pid=None, phase=None)
        except TunerError as exc:
            return update_status(run_dir, status="failed", error=str(exc), pid=None, phase=None)
        except Exception as exc:  # the run fails; the caller (app, CLI) keeps going
            error = ("Out of memory. Fix: lower batch_size or max_length." if is_oom(exc)
                     else f"{type(exc).__name__}: {exc}")
            traceback.print_exc()  # into train.log when run by tuner.jobs
            remove_incomplete_checkpoints(run_dir)
            return update_status(run_dir, status="failed", error=error, pid=None, phase=None,
                                 session_s=round(time.monotonic() - started, 1))
        finally:
            release_memory(dev)


def _trainer_args(pcfg: PreferenceConfig, run_dir: Path, dev: str, prec: dict[str, Any], n_train: int):
    common = dict(
        output_dir=str(Run(run_dir).checkpoints_dir), per_device_train_batch_size=pcfg.batch_size,
        learning_rate=pcfg.learning_rate, max_steps=pcfg.planned_steps(n_train),  # passes, at least min_steps
        warmup_steps=pcfg.warmup_ratio,
        seed=pcfg.seed, data_seed=pcfg.seed, beta=pcfg.beta, max_length=pcfg.max_length,
        bf16=prec["bf16"], fp16=prec["fp16"], use_cpu=dev == "cpu", eval_strategy="no",
        save_strategy="steps", save_steps=10, save_total_limit=2,
        logging_steps=1, logging_first_step=True, logging_nan_inf_filter=False, report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
    )
    if pcfg.method == "kto":
        return KTOConfig(**common)
    if pcfg.sft_weight > 0:
        return DPOConfig(**common, loss_type=[pcfg.loss, "sft"], loss_weights=[1.0, pcfg.sft_weight])
    return DPOConfig(**common, loss_type=[pcfg.loss])


def _train(run_dir: Path, resume: bool, progress, dev: str, callbacks: list[TrainerCallback]) -> dict[str, Any]:
    """Set up, train, score and save a preference run, in order (what build_trainer and train_run do for SFT). Long on purpose: DPO and KTO share every step but the trainer class."""
    run = Run(run_dir)
    check_data(run_dir)
    status = read_status(run_dir)
    pcfg = PreferenceConfig.from_dict(status["preference"])
    cfg = run.config()
    parent = Run(Path(status["parent_dir"]))
    if not parent.adapter_dir.is_dir():
        raise TrainingError(f"The parent run's adapter is gone ({parent.adapter_dir}). Fix: restore the parent run.")
    update_status(run_dir, phase="loading the model, the parent's adapter and the preferences")
    set_seed(pcfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    chat_template = tokenizer.chat_template
    prec, quant = precision(cfg, dev), quantization(cfg, dev)
    base = load_model(cfg.base_model, quantization=quant, dtype=prec["weights"], dev=dev)
    if quant == "nf4" and dev == "cpu":
        keep_4bit_layout_trainable(base)
    text = base.config.get_text_config()
    # DPO runs chosen and rejected together: twice the batch in one forward
    attn = attention(dev, pcfg.max_length, "grouped", 2 * pcfg.batch_size, text.num_attention_heads,
                     text.num_hidden_layers)
    if attn != base.config._attn_implementation:
        base.set_attn_implementation(attn)
    model = PeftModel.from_pretrained(base, str(parent.adapter_dir), is_trainable=True)  # "default" = the parent

    rows = read_jsonl(run.preferences_file)
    train_rows, held = feedback.split(rows, pcfg.held_out if is_paired(rows) else 0.0, pcfg.seed)
    if not train_rows:
        raise DataError("holds no rows to train on.", file=str(run.preferences_file))
    sft_train = read_examples(run.data_file("train.jsonl"))
    sft_val = read_examples(run.data_file("validation.jsonl")) if run.data_file("validation.jsonl").is_file() else []
    agent_replies = [m["content"] for r in sft_train for m in r["messages"] if m["role"] == "assistant"]
    budget = reply_budget(tokenizer, agent_replies)
    reply_prompts = behaviour_prompts(sft_train, sft_val, rows if is_paired(rows) else [], BEHAVIOUR_PROMPTS,
                                      cfg.seed)

    # before: the parent (the adapter as loaded), and the base as the common reference
    update_status(run_dir, phase=f"scoring {len(held)} held-out pairs (the parent, before training)")
    with model.disable_adapter():
        base_logps = _logps(model, tokenizer, held, pcfg.max_length)
    before = preference_scores(_logps(model, tokenizer, held, pcfg.max_length), base_logps, pcfg.beta)

    checkpoint, offset = None, {}
    if resume:
        removed = remove_incomplete_checkpoints(run_dir)
        found = complete_checkpoints(run_dir)
        checkpoint = found[-1] if found else None
        offset = offset_from(truncate_metrics(run_dir, checkpoint_step(checkpoint) if checkpoint else 0))
        update_status(run_dir, resumed_from=checkpoint.name if checkpoint else None, removed_incomplete=removed)
    elif is_main_process():
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        run.metrics_file.unlink(missing_ok=True)

    # DPO's loss adds the fine-tuning term (a per-token loss) at its weight; the preference loss itself starts at ln 2
    terms = 1.0 + (pcfg.sft_weight + pcfg.edit_weight if pcfg.method == "dpo" else 0.0)
    recorder = RunRecorder(run_dir, offset, False, progress, model.config.get_text_config().vocab_size,
                           loss_terms=terms)
    own: list[TrainerCallback] = [recorder, OverheadBudget(1.0, pcfg.save_every_s)]
    disable_progress_bars()  # trl's map() bars would flood train.log
    edits = pcfg.edit_weight > 0 or pcfg.anchor_weight > 0
    trainer_cls = KTOTrainer if pcfg.method == "kto" else EditWeightedDPOTrainer if edits else DPOTrainer
    extra = ({"edit_weight": pcfg.edit_weight, "anchor_weight": pcfg.anchor_weight}
             if trainer_cls is EditWeightedDPOTrainer else {})
    trainer = trainer_cls(model=model, ref_model=None, args=_trainer_args(pcfg, run_dir, dev, prec, len(train_rows)),
                          train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer,
                          callbacks=own + list(callbacks), **extra)
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress callback instead
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trl makes a 4-bit model's adapter bf16; tuner keeps fp32 masters (exact AdamW)
    update_status(run_dir, device=dev, precision=prec["name"], quantization=quant, attention=attn,
                  train_rows=len(train_rows), held_out_pairs=len(held),
                  trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    with training_context(trainer.model, prec):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    model = trainer.model
    model.set_adapter("default")
    update_status(run_dir, phase=f"scoring {len(held)} held-out pairs and asking {len(reply_prompts)} prompts "
                                 "(parent and child, as the playground serves them)")
    after = preference_scores(_logps(model, tokenizer, held, pcfg.max_length), base_logps, pcfg.beta)
    served = served_model(model, cfg.base_model, quant, dev)
    with parent_beside(served, parent.adapter_dir):
        parent_replies, child_replies = parent_and_child_replies(served, tokenizer, chat_template, reply_prompts,
                                                                 budget)

        def parent_next(sites: list[tuple[int, str]]) -> list[str]:
            return generate(served, tokenizer, chat_template, [reply_prompts[i] for i, _ in sites], NEXT_WORDS_TOKENS,
                            batch_size=16, adapter_names=["parent"] * len(sites), prefixes=[p for _, p in sites])[0]

        update_status(run_dir, phase="general text, parent and child")
        fast = bool(prec["bf16"])  # the probe measured bf16 faster here: half the time, the same ratio
        general = {who: general_text(served, tokenizer, adapter, fast) for who, adapter in (("parent", "parent"),
                                                                                             ("child", "default"))}
        checked = behaviour_check(rows, pcfg.method, parent_replies, child_replies, parent_next, general)
    voice = None
    if cfg.voice_prompts:
        update_status(run_dir, phase="the parent's voice and forgetting check, on the child")
        asked = held_out_prompts(sft_train, sft_val, cfg.voice_prompts, cfg.seed)
        voice = model_verdict(served, tokenizer, chat_template, habit_of(agent_replies), asked, budget,
                              references=held_out_references(asked, sft_val))
    if "ref" in model.peft_config:
        model.delete_adapter("ref")  # the frozen copy of the parent is no part of the result
    metrics = run.metrics()
    summary = {
        "step": int(trainer.state.global_step), "max_steps": int(trainer.state.max_steps),
        "first_loss": next((m["loss"] for m in metrics if m.get("loss") is not None), None),
        "train_loss": next((m["loss"] for m in reversed(metrics) if m.get("loss") is not None), None),
        "behaviour": checked, "general_text": general,
        "preference_metrics": {"held_out_pairs": len(held), "beta": pcfg.beta, "before": before, "after": after,
                               "reference": "base model (adapter off)"},
        "voice": voice, "voice_parent": parent.status().get("voice"),
        "replies": [{"prompt": p[-1]["content"], "parent": a, "child": b}
                    for p, a, b in zip(reply_prompts, parent_replies[0], child_replies[0], strict=False)],
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
    }
    update_status(run_dir, phase="saving and checking the result")
    tokenizer.chat_template = chat_template
    _save(trainer, cfg, pcfg, run_dir, summary, read_status(run_dir), prec["name"], dev)
    summary["wall_s"] = round(recorder.elapsed(), 1)
    return update_status(run_dir, status="completed", phase="done", error=None, adapter=str(run.adapter_dir), pid=None,
                         eta_s=0, peak_memory_mb=peak_memory_mb(dev), **summary)


def _save(trainer, cfg: TrainConfig, pcfg: PreferenceConfig, run_dir: Path, summary: dict[str, Any],
          status: dict[str, Any], prec: str, dev: str) -> None:
    """Save the child's adapter as SFT saves its result (whole or not at all, reload-checked), with its card."""
    save_result(trainer, cfg, run_dir, Run(run_dir).adapter_dir,
                model_card(cfg, pcfg, summary, status, prec, dev, run_dir))


def model_card(cfg: TrainConfig, pcfg: PreferenceConfig, summary: dict[str, Any], status: dict[str, Any], prec: str,
               dev: str, run_dir: Path) -> str:
    base_id = DEFAULT_HUB_ID if is_default(cfg.base_model) else cfg.base_model
    pm = summary["preference_metrics"]
    b, a = pm["before"], pm["after"]

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))

    sources = read_json(Run(run_dir).sources_file, {})
    trainer_name = "KTOTrainer" if pcfg.method == "kto" else "DPOTrainer"
    lines = [
        "---", f"base_model: {base_id}", "library_name: peft", f"tags: [tuner, trl, {pcfg.method}, lora]", "---", "",
        f"# {run_dir.name}", "",
        f"A LoRA adapter trained by tuner {__version__} with trl's {trainer_name} on reviewers' preferences, "
        f"starting from the adapter of run `{status.get('parent')}` on {base_id}"
        f"{' (base in 4-bit NF4: QLoRA)' if status.get('quantization') == 'nf4' else f' (base in {prec})'}.", "",
        f"Lineage: {' -> '.join(str(x) for x in status.get('lineage') or [])}", "",
        "## Results", "",
        f"**What the reviewers' edits changed** (greedy replies to new questions, outside the pairs and the "
        f"training data, from parent and child as the playground serves them): "
        f"{(summary.get('behaviour') or {}).get('sentence', 'not measured.')}", "",
        *[f"- {c['change']} (in {c['pairs_with_change']} of {c['pairs']} pairs): child {c['child']['shown']} of "
          f"{c['child']['prompts']}, parent {c['parent']['shown']} of {c['parent']['prompts']}"
          for c in (summary.get("behaviour") or {}).get("changes") or []], "",
        f"**Held-out pairs**: {feedback.pairs_sentence(pm, method=pcfg.method.upper())}", "",
        f"Held-out pairs (a seeded {pcfg.held_out:.0%} split, never trained on): {pm['held_out_pairs']}. "
        "Implicit reward = beta x (log p(reply | prompt) - the base model's), the same reference for both.", "",
        "| | parent (before) | this run (after) |", "|---|---|---|",
        f"| preference accuracy (chosen reply's reward above the rejected one's) | {fmt(b['accuracy'])} | "
        f"{fmt(a['accuracy'])} |",
        f"| reward margin (mean, chosen - rejected) | {fmt(b['margin'])} | {fmt(a['margin'])} |",
        f"| training loss, first / last | {fmt(summary.get('first_loss'))} | {fmt(summary.get('train_loss'))} |",
        f"| steps | | {summary.get('step')} of {summary.get('max_steps')} |",
        f"| device, precision | | {dev}, {prec} |", "",
    ]
    if (summary.get("voice") or {}).get("sentence"):
        lines += [f"**Voice check** (the parent's held-out prompts, greedy replies): "
                  f"{summary['voice']['sentence'].rstrip('.')}.", ""]
    lines += ["## Data", ""]
    for name, info in sources.items():
        lines.append(f"- `{name}`: {info.get('examples')} rows, sha256 `{info['sha256']}`")
    lines += ["", "## Settings", ""]
    if (status.get("edit_settings") or {}).get("sentence"):
        lines += [f"{status['edit_settings']['sentence']} (tuner.config.EDIT_SETTINGS)", ""]
    lines += ["```yaml", *[f"{k}: {v}" for k, v in pcfg.to_dict().items()], "```", "",
              "Use it with peft:", "", "```python", "from peft import AutoPeftModelForCausalLM",
              "model = AutoPeftModelForCausalLM.from_pretrained('adapter/')", "```", ""]
    return "\n".join(lines)


def status_keys() -> tuple[str, ...]:
    """What `train --json` prints for a preference run besides the SFT keys."""
    return ("parent", "method", "lineage", "behaviour", "general_text", "preference_metrics", "voice_parent", "replies",
            "held_out_pairs", "train_rows", "preference", "edit_settings")
