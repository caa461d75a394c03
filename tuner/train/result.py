"""The finished run's result: saved whole or not at all, reloaded and compared, with a model card."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from safetensors.torch import load_file

from tuner import __version__
from tuner.config import Method, TrainConfig
from tuner.dataset import pii_statement
from tuner.errors import TrainingError
from tuner.models import DEFAULT_HUB_ID, is_default
from tuner.runs import Run, is_main_process, read_json, world_size


def save_result(trainer, cfg: TrainConfig, run_dir: Path, out_dir: Path, card: str) -> None:
    """Save to a temporary folder with its model card, check that it reloads, then rename it into place."""
    tmp = run_dir / f".{out_dir.name}.tmp"
    if not is_main_process():
        trainer.save_model(str(tmp))  # every process takes part (sharded weights are gathered); rank 0 writes
        return
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))
        # security: the result holds safetensors and JSON only; training_args.bin is a pickle nobody needs here
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        verify_result(trainer.model, tmp, cfg)
        old = run_dir / f".{out_dir.name}.old"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_card(out_dir: Path, card: str) -> None:
    """Replace a saved result's model card whole (the voice check's verdict comes after the weights)."""
    tmp = out_dir / ".README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, out_dir / "README.md")


def verify_result(model, folder: Path, cfg: TrainConfig) -> None:
    """Reload what was saved and compare it with the trained weights; raise if it does not match.

    For LoRA the adapter is loaded next to the trained one by peft's own loader (no second copy of
    the base model); for full fine-tuning the saved checkpoint is read back tensor by tensor.
    """
    if world_size() > 1:  # weights may be sharded across processes: check what was written, not values
        if cfg.method is Method.LORA:
            PeftConfig.from_pretrained(str(folder))
        if not any(load_file(str(f)) for f in folder.glob("*.safetensors")):
            raise TrainingError(f"No weights were written to {folder}.")
        return
    if cfg.method is Method.LORA:
        name = "_reload_check"
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        try:
            trained = {k: v for k, v in model.state_dict().items() if ".default." in k and "lora_" in k}
            loaded = {k.replace(f".{name}.", ".default."): v for k, v in model.state_dict().items()
                      if f".{name}." in k}
            if not trained or trained.keys() != loaded.keys():
                raise TrainingError(f"The saved adapter in {folder} does not hold the trained LoRA layers.")
            for key, value in trained.items():
                if not torch.equal(value.float(), loaded[key].float()):
                    raise TrainingError(f"The saved adapter differs from the trained one at {key}.")
        finally:
            model.delete_adapter(name)
            model.set_adapter("default")
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"No weights were written to {folder}.")
    saved: dict[str, Any] = {}
    for f in files:
        saved.update(load_file(str(f)))
    for key, value in model.state_dict().items():
        if key in saved and not torch.equal(saved[key].float().cpu(), value.float().cpu()):
            raise TrainingError(f"The saved model differs from the trained one at {key}.")


def model_card(cfg: TrainConfig, summary: dict[str, Any], data_stats: dict[str, Any], prec: str, dev: str,
               run_dir: Path) -> str:
    base = DEFAULT_HUB_ID + " (embedded copy)" if is_default(cfg.base_model) else cfg.base_model
    sources = read_json(Run(run_dir).sources_file, {})
    tr, va = data_stats["train"], data_stats["validation"]

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))

    kind = "LoRA adapter" if cfg.method is Method.LORA else "fully fine-tuned model"
    quant = ""
    if cfg.method is Method.LORA:
        quant = " (base in 4-bit NF4: QLoRA)" if summary.get("quantization") == "nf4" else f" (base in {prec})"
    lines = [
        "---", f"base_model: {DEFAULT_HUB_ID if is_default(cfg.base_model) else cfg.base_model}",
        "library_name: peft" if cfg.method is Method.LORA else "library_name: transformers",
        "tags: [tuner, trl, sft" + (", lora]" if cfg.method is Method.LORA else "]"), "---", "",
        f"# {run_dir.name}", "",
        f"A {kind} trained by tuner {__version__} with trl's SFTTrainer on {base}{quant}.", "",
        "## Results", "",
        "| | value |", "|---|---|",
        f"| validation loss before training ({summary.get('eval_examples')} examples) | "
        f"{fmt(summary.get('first_eval_loss'))} |",
        f"| validation loss of these weights (best, same examples) | {fmt(summary.get('eval_loss'))} |",
        f"| validation loss on all {va['examples']} validation examples | {fmt(summary.get('eval_loss_all'))} |",
        f"| first / final training loss | {fmt(summary.get('first_loss'))} / {fmt(summary.get('train_loss'))} |",
        f"| steps (best step) | {summary.get('step')} of {summary.get('max_steps')} ({summary.get('best_step')}) |",
        f"| tokens trained | {summary.get('tokens_trained')} |",
        f"| device, precision | {dev}, {prec} |", "",
        *([f"**Voice check** (held-out prompts that occur nowhere in training, greedy replies): "
           f"{summary['voice']['sentence'].rstrip('.')}.", ""] if (summary.get("voice") or {}).get("sentence") else []),
        "## Data", "",
        f"- training: {tr['examples']} conversations, {tr['tokens']} tokens, {tr['trained_tokens']} of them in "
        f"assistant replies (the loss is on those{'' if cfg.assistant_only_loss else ' and every other token'})",
        f"- validation: {va['examples']} conversations, {va['tokens']} tokens",
        f"- truncated to {cfg.max_length} tokens: {tr['truncated'] + va['truncated']}",
    ]
    for name, info in sources.items():
        lines.append(f"- `{name}` sha256 `{info['sha256']}`")
    lines += ["", pii_statement(Run(run_dir).data_report())]
    lines += ["", "## Settings", "", "```yaml"]
    lines += [f"{k}: {v}" for k, v in cfg.to_dict().items()]
    lines += ["```", "", "Use it with peft:" if cfg.method is Method.LORA else "Use it with transformers:", "",
              "```python"]
    if cfg.method is Method.LORA:
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained('adapter/')"]
    else:
        lines += ["from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained('model/')"]
    lines += ["```", ""]
    return "\n".join(lines)
