"""tuner.precision: `precision: auto` on a CPU follows a measurement on this machine, cached, never a flag rule."""

from __future__ import annotations

import json

import torch

from tuner import precision as probe_mod
from tuner import train
from tuner.config import TrainConfig

TINY = (64, 128, 32)  # hidden, intermediate, key/value width: a probe of a few milliseconds


def test_the_probe_times_both_precisions_and_keeps_the_faster():
    result = probe_mod.probe(*TINY, tokens=32, repeats=3)
    assert result["fp32_ms"] > 0
    if result["bf16_ms"] is None:  # a build without bf16 kernels
        assert result["choice"] == "fp32"
    else:
        speedup = result["fp32_ms"] / result["bf16_ms"]
        assert abs(speedup - result["bf16_speedup"]) < 0.02 * speedup + 0.01
        assert result["choice"] == ("bf16" if result["bf16_speedup"] >= probe_mod.BF16_MIN_SPEEDUP else "fp32")
    assert result["threads"] == torch.get_num_threads()


def test_the_choice_is_cached_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_HOME", str(tmp_path))
    first = probe_mod.cpu_precision(TINY)
    assert first["cached"] is False and first["cpu"]["model"]
    again = probe_mod.cpu_precision(TINY)
    assert again["cached"] is True and again["measured_at"] == first["measured_at"]
    assert again["choice"] == first["choice"]
    cache = json.loads((tmp_path / probe_mod.CACHE_FILE).read_text())["cpu_precision"]
    assert len(cache) == 1 and "x".join(map(str, TINY)) in next(iter(cache))
    other = probe_mod.cpu_precision((32, 64, 32))  # another model's shapes are measured on their own
    assert other["cached"] is False and len(json.loads((tmp_path / probe_mod.CACHE_FILE).read_text())["cpu_precision"]) == 2


def test_auto_follows_the_measurement_and_a_forced_choice_wins(tmp_path, monkeypatch, default_model_path):
    monkeypatch.setenv("TUNER_HOME", str(tmp_path))
    shape = probe_mod.model_shapes(json.loads((default_model_path / "config.json").read_text()))
    assert shape == (576, 1536, 192)  # SmolLM2-135M
    for measured in ("fp32", "bf16"):  # the condition is set explicitly: whatever this CPU is
        probe_mod.remember(shape, {"choice": measured, "fp32_ms": 1.0, "bf16_ms": 1.0, "bf16_speedup": 1.0})
        chosen = train.precision(TrainConfig(), "cpu")
        assert chosen["name"] == measured and chosen["bf16"] == (measured == "bf16")
        assert chosen["weights"] == (torch.bfloat16 if measured == "bf16" else torch.float32)
        assert train.precision(TrainConfig(precision="fp32"), "cpu")["name"] == "fp32"
        assert train.precision(TrainConfig(precision="bf16"), "cpu")["name"] == "bf16"
    full = train.precision(TrainConfig(method="full", quantization="none"), "cpu")
    assert full["name"] == "bf16 autocast" and full["weights"] == torch.float32  # fp32 master weights


def test_describe_says_what_was_chosen_and_by_how_much():
    line = probe_mod.describe({"choice": "bf16", "fp32_ms": 150.0, "bf16_ms": 50.0, "bf16_speedup": 3.0})
    assert line.startswith("bf16") and "150.0 ms in fp32" in line and "3.0x" in line
    assert probe_mod.describe({"choice": "fp32", "fp32_ms": 9.0, "bf16_ms": None}).startswith("fp32 (this CPU has no")


def test_the_playground_and_the_voice_check_serve_fp32_on_a_cpu_whatever_the_probe_chose(tmp_path, monkeypatch,
                                                                                       default_model_path):
    monkeypatch.setenv("TUNER_HOME", str(tmp_path))
    shape = probe_mod.model_shapes(json.loads((default_model_path / "config.json").read_text()))
    for measured in ("fp32", "bf16"):  # set explicitly: any CPU
        probe_mod.remember(shape, {"choice": measured, "fp32_ms": 1.0, "bf16_ms": 1.0, "bf16_speedup": 1.0})
        assert probe_mod.serving_dtype("cpu") == torch.float32  # bf16 replies depend on a batch's padding
