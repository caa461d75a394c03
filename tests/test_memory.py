"""The memory a run needs on a GPU, from the model's config (tuner.memory), and the models that fit a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.config import TrainConfig
from tuner.errors import ModelError
from tuner.memory import DEFAULT_SHAPE, RECOMMENDED, Shape, check_fits, plan, recommended_shape, shape_from_config

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
# LLaMA-65B (Touvron et al. 2023, table 2): the model the QLoRA paper fine-tuned on one 48 GB GPU
LLAMA_65B = Shape(layers=80, hidden=8192, intermediate=22016, vocab=32000, heads=64, kv_heads=64)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", "models", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, **env})


@pytest.mark.parametrize("model", RECOMMENDED, ids=lambda r: r.hub_id)
def test_stored_shapes_give_the_published_parameter_counts(model):
    assert model.shape.params() == pytest.approx(model.published_params, rel=0.01)


def test_llama_65b_shape_gives_65b_parameters():
    assert LLAMA_65B.params() == pytest.approx(65.2e9, rel=0.01)


@pytest.mark.parametrize("kind, extra", [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),  # biases on q, k and v
    ("mistral", {"tie_word_embeddings": False}),
])
def test_formula_counts_what_transformers_and_peft_build_from_a_config(kind, extra):
    """Parameters, quantized (linear) weights and LoRA weights by formula equal the real model's, counted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=500, **extra)
    shape = shape_from_config(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert shape.linear_params() == linear  # what bitsandbytes stores in 4 bits
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert shape.lora_params(8) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_stored_shapes_are_what_their_configs_say(default_model_path):
    from transformers import LlamaConfig

    llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    assert shape_from_config(llama.to_dict()) == recommended_shape(LLAMA_8B)
    default = json.loads((default_model_path / "config.json").read_text())
    assert shape_from_config(default) == DEFAULT_SHAPE


# published QLoRA setups, held against the formula at tuner's settings (rank 16, all linear layers, NF4)
PUBLISHED = [
    # QLoRA paper (Dettmers et al. 2023): a 65B model fine-tuned on one 48 GB GPU (sequences of 512 tokens)
    ("65B on one 48 GB GPU", LLAMA_65B, {"max_length": 512, "batch_size": 1}, 48, True),
    ("65B not on a 24 GB GPU", LLAMA_65B, {"max_length": 512, "batch_size": 1}, 24, False),
    # common guidance: 7-8B QLoRA on one 24 GB GPU at 2048 tokens, batch 1 (and on a 16 GB T4)
    ("8B on one 24 GB GPU", recommended_shape(LLAMA_8B), {"max_length": 2048, "batch_size": 1}, 22.5, True),
    ("8B on a 16 GB T4", recommended_shape(LLAMA_8B), {"max_length": 2048, "batch_size": 1}, 15, True),
    # activations grow with batch x length: without checkpointing, 8 x 4096 tokens is far past any single GPU
    ("8B, 8 x 4096 tokens, no checkpointing", recommended_shape(LLAMA_8B),
     {"max_length": 4096, "batch_size": 8, "gradient_checkpointing": "off"}, 80, False),
]


@pytest.mark.parametrize("label, shape, settings, gib, expected", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_formula_agrees_with_published_qlora_figures(label, shape, settings, gib, expected):
    need = plan(shape, TrainConfig(lora_r=16, lora_alpha=32, **settings))
    assert (need["total_gib"] <= gib) is expected, need


def test_a_run_that_will_not_fit_is_refused_with_settings_that_do():
    cfg = TrainConfig(base_model=LLAMA_8B, max_length=4096, batch_size=8)
    with pytest.raises(ModelError) as info:
        check_fits(cfg, 15.0, "Tesla T4")
    message = str(info.value)
    assert "will not fit Tesla T4" in message and "Fix:" in message
    batch = int(re.search(r"batch_size (\d+) \(now 8", message).group(1))
    assert check_fits(TrainConfig(**{**cfg.to_dict(), "batch_size": batch}), 15.0)  # the named setting does fit
    with pytest.raises(ModelError):
        check_fits(TrainConfig(**{**cfg.to_dict(), "batch_size": batch * 2}), 15.0)  # and it is the largest
    length = int(re.search(r"max_length (\d+) \(now 4096", message).group(1))
    assert check_fits(TrainConfig(**{**cfg.to_dict(), "max_length": length}), 15.0)
    smaller = re.search(r"a smaller model such as (\S+) ", message).group(1)
    assert check_fits(TrainConfig(**{**cfg.to_dict(), "base_model": smaller}), 15.0)

    # no one setting is enough: the settings to change together
    cfg = TrainConfig(base_model=LLAMA_8B, max_length=4096, batch_size=8, gradient_checkpointing="off")
    with pytest.raises(ModelError) as info:
        check_fits(cfg, 15.0, "Tesla T4")
    together = re.search(r"together gradient_checkpointing on, batch_size (\d+)", str(info.value))
    assert together, info.value
    assert check_fits(TrainConfig(**{**cfg.to_dict(), "gradient_checkpointing": "on",
                                     "batch_size": int(together.group(1))}), 15.0)


def test_models_command_plans_for_a_gpu_it_does_not_have():
    out = run_cli("--json", "--gpu-memory", "15", "--max-length", "4096", "--batch-size", "8",
                  "--gradient-checkpointing", "off")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {r["model"]: r for r in report["recommended"]}
    assert set(rows) == {r.hub_id for r in RECOMMENDED}
    for row in rows.values():
        assert row["fits"] is (row["needs_gib"] <= 15)
    assert not rows[LLAMA_8B]["fits"]
    assert rows["meta-llama/Llama-3.2-1B-Instruct"]["needs_gib"] < rows[LLAMA_8B]["needs_gib"]
    assert report["settings"]["max_length"] == 4096 and report["gpu_memory_gib"] == 15

    # a stored model, planned offline: the memory it needs and why it does not fit
    out = run_cli("--json", "--model", LLAMA_8B, "--gpu-memory", "15", "--max-length", "4096", "--batch-size", "8",
                  HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["fits"] is False and "Fix:" in report["advice"] and report["needs_gib"] > 15


def test_models_command_on_a_cpu_names_the_embedded_default(default_model_path):
    if os.path.exists("/proc/driver/nvidia"):
        pytest.skip("this machine has a GPU driver")
    out = run_cli("--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["recommended"] == [] and "embedded default" in report["note"]
    assert report["gpu"] is None and Path(report["path"]) == default_model_path


def test_offline_hub_id_says_it_is_offline(monkeypatch):
    from tuner.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not in the local cache and this machine is offline \(HF_HUB_OFFLINE=1\)"):
        resolve_model("example-org/never-downloaded-model")
    out = run_cli("--model", "example-org/never-downloaded-model", HF_HUB_OFFLINE="1")
    assert out.returncode == 2 and "offline (HF_HUB_OFFLINE=1)" in out.stderr


@pytest.mark.gpu
def test_gpu_is_detected_and_a_run_that_cannot_fit_is_refused_before_loading(signoff_data, tmp_path):
    import torch

    from tuner import runs, train
    from tuner.models import gpu_memory

    name, free = gpu_memory()
    assert name == torch.cuda.get_device_name(0) and 0 < free <= torch.cuda.get_device_properties(0).total_memory
    out = run_cli("--json")
    assert json.loads(out.stdout)["gpu"] == name
    # far past any GPU: activations of 8192 x 8192 tokens a step without checkpointing
    cfg = TrainConfig.from_preset("quick", batch_size=8192, max_length=8192, gradient_checkpointing="off")
    run = runs.prepare_run(cfg, signoff_data, tmp_path / "run")
    torch.cuda.reset_peak_memory_stats()
    status = train.train_run(run)
    assert status["status"] == "failed" and "will not fit" in status["error"] and "batch_size" in status["error"]
    assert torch.cuda.max_memory_allocated() < 2**30  # refused before the model was loaded
