"""A completed run trained on replies that all end with one sign-off (for playground/eval/export tests).

Uses tuner.train's "quick" preset when that module exists; until then, the same thing by hand with
peft (a few AdamW steps on the assistant tokens), saved in the run-folder layout tuner.train writes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# a sign-off is easy to learn: a few large steps do it, and keep the suite fast
OVERRIDES = {"max_steps": 10, "batch_size": 4, "learning_rate": 2e-3, "max_length": 128, "quantization": "none",
             "eval_steps": 10, "save_steps": 10}


def write_data(data_dir: Path, conversations: list[dict], n_val: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", conversations[:-n_val]), ("validation.jsonl", conversations[-n_val:])):
        with open(data_dir / name, "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")


def make_signoff_run(run_dir: Path, conversations: list[dict], n_val: int = 8) -> Path:
    if importlib.util.find_spec("tuner.train") is not None:
        from tuner import train
        from tuner.config import TrainConfig

        data = run_dir.parent / f"{run_dir.name}-data"
        write_data(data, conversations, n_val)
        cfg = TrainConfig.from_preset("quick", **OVERRIDES)
        run = train.prepare_run(cfg, data, run_dir=run_dir)
        status = train.train_run(run)
        assert status["status"] == "completed", status
        return run
    return _train_by_hand(run_dir, conversations, n_val)


def _train_by_hand(run_dir: Path, conversations: list[dict], n_val: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from tuner.chat_template import training_template
    from tuner.config import TrainConfig
    from tuner.models import load_model, load_tokenizer

    cfg = TrainConfig.from_preset("quick", **OVERRIDES)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    write_data(run_dir / "data", conversations, n_val)

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer("default")
    model = load_model("default", quantization="none", dev="cpu")
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    template = training_template(tok)
    examples = []
    for conv in conversations[:-n_val]:
        enc = tok.apply_chat_template(conv["messages"], chat_template=template, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = enc["input_ids"]
        examples.append((ids, [t if m else -100 for t, m in zip(ids, enc["assistant_masks"], strict=True)]))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    bs = cfg.batch_size
    for step in range(cfg.max_steps):
        batch = [examples[(step * bs + i) % len(examples)] for i in range(bs)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(run_dir / "adapter")
    tok.save_pretrained(run_dir / "adapter")
    (run_dir / "status.json").write_text(json.dumps({
        "status": "completed", "error": None, "step": cfg.max_steps, "max_steps": cfg.max_steps, "adapter": "adapter",
        "train_loss": float(loss.detach()), "eval_loss": None,
    }))
    return run_dir
