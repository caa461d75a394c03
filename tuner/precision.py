"""Which compute precision trains fastest on this CPU: measured once, cached per machine.

A flag rule (bf16 where the CPU has AMX) was right on one Intel machine and wrong on an AMD EPYC
with AVX512-BF16 and no AMX, where bf16 ran a whole run 1.48x faster than fp32. So `precision: auto`
on a CPU runs a short probe instead: the forward and backward of one decoder layer's LoRA-wrapped
linear layers, on the model's own shapes, in fp32 and under bf16 autocast, and keeps the faster.
The result is cached in TUNER_HOME/machine.json, keyed by CPU, torch version, threads and shapes.

Light module: torch is imported inside the functions that measure.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from tuner.paths import tuner_home

CACHE_FILE = "machine.json"
# the flags that decide how fast bf16 and fp32 matmuls run on x86 (oneDNN picks its kernels from them)
RELEVANT_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma")
PROBE_TOKENS = 512  # a batch of 4-8 short support chats
PROBE_REPEATS = 5
LORA_RANK = 16
# a probe margin: bf16 must win by this much, since it also costs a little accuracy (rounding)
BF16_MIN_SPEEDUP = 1.05


def cpu_info() -> dict[str, Any]:
    """The CPU model and the flags that matter for training speed, from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in RELEVANT_FLAGS if f in flags], "cores": os.cpu_count()}


def _layer_shapes(hidden: int, intermediate: int, kv: int) -> list[tuple[int, int]]:
    """(in, out) of a Llama-style decoder layer's linear layers: q, k, v, o, gate, up, down."""
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
            (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]


def model_shapes(config: dict[str, Any]) -> tuple[int, int, int]:
    """(hidden, intermediate, kv width) from a transformers config.json."""
    hidden = int(config.get("hidden_size") or 576)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    return hidden, intermediate, kv


def _lora_step(shapes: list[tuple[int, int]], bf16: bool, tokens: int):
    """A forward+backward through LoRA-wrapped linear layers (frozen base, fp32 adapters), as peft runs them."""
    import torch
    from torch.nn.functional import linear

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    layers = []
    for n_in, n_out in shapes:
        base = (torch.randn(n_out, n_in, generator=gen) * n_in ** -0.5).to(dtype)
        a = (torch.randn(LORA_RANK, n_in, generator=gen) * 0.01).requires_grad_()
        b = (torch.randn(n_out, LORA_RANK, generator=gen) * 0.01).requires_grad_()
        layers.append((base, a, b))
    inputs = {n_in: torch.randn(tokens, n_in, generator=gen).to(dtype) for n_in, _ in shapes}

    def step() -> None:
        # the input needs its gradient too: backpropagation runs through every frozen base layer
        xs = {w: x.detach().requires_grad_() for w, x in inputs.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = [linear(xs[base.shape[1]], base) + linear(linear(xs[base.shape[1]], a), b) * 2.0
                    for base, a, b in layers]
        sum(y.float().square().mean() for y in outs).backward()

    return step


def probe(hidden: int, intermediate: int, kv: int, tokens: int = PROBE_TOKENS,
          repeats: int = PROBE_REPEATS) -> dict[str, Any]:
    """Time fp32 and bf16 on these shapes, alternating (a busy machine slows both alike); medians, and the faster."""
    import torch

    shapes = _layer_shapes(hidden, intermediate, kv)
    steps = {"fp32": _lora_step(shapes, False, tokens)}
    try:
        steps["bf16"] = _lora_step(shapes, True, tokens)
        steps["bf16"]()  # warm-up: oneDNN picks and caches its kernels on the first call
    except RuntimeError:  # a CPU or build without bf16 kernels
        steps.pop("bf16")
    steps["fp32"]()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    speedup = median["fp32"] / median["bf16"] if "bf16" in median else 0.0
    return {"choice": "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32",
            "fp32_ms": round(median["fp32"] * 1000, 2),
            "bf16_ms": round(median["bf16"] * 1000, 2) if "bf16" in median else None,
            "bf16_speedup": round(speedup, 2), "tokens": tokens, "threads": torch.get_num_threads(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _cache_key(shape: tuple[int, int, int]) -> str:
    import torch

    cpu = cpu_info()
    return "|".join([cpu["model"], ",".join(cpu["flags"]), f"torch {torch.__version__}",
                     f"{torch.get_num_threads()} threads", "x".join(map(str, shape))])


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_precision(shape: tuple[int, int, int] = (576, 1536, 192), measure: bool = True) -> dict[str, Any] | None:
    """The measured precision for training on this CPU (cached); `shape` is model_shapes() of the base.

    The default shape is SmolLM2-135M's. Returns probe()'s dict plus `cached` and `cpu`; with `measure`
    False, None when this CPU was not probed yet (for callers that must not wait for the probe).
    """
    cached = _read_cache(tuner_home() / CACHE_FILE).get("cpu_precision", {}).get(_cache_key(shape))
    if isinstance(cached, dict) and cached.get("choice") in ("bf16", "fp32"):
        return {**cached, "cached": True, "cpu": cpu_info()}
    if not measure:
        return None
    return {**remember(shape, probe(*shape)), "cached": False, "cpu": cpu_info()}


def remember(shape: tuple[int, int, int], result: dict[str, Any]) -> dict[str, Any]:
    """Store a probe result in TUNER_HOME's machine cache (atomically); returns it."""
    path = tuner_home() / CACHE_FILE
    data = _read_cache(path)
    data.setdefault("cpu_precision", {})[_cache_key(shape)] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home measures again next time; the run goes on
    return result


def for_model(base_model: str, measure: bool = True) -> dict[str, Any]:
    """cpu_precision() for a base model's shapes ('default', a local folder or a Hub id)."""
    from tuner.models import resolve_model

    location = Path(resolve_model(base_model))
    try:
        config = json.loads((location / "config.json").read_text()) if location.is_dir() else {}
    except (OSError, ValueError):
        config = {}
    return cpu_precision(model_shapes(config if isinstance(config, dict) else {}), measure)


def serving_dtype(dev: str | None = None):
    """The dtype in which the playground, `tuner eval` and a run's voice check hold the base's weights: one
    choice, so the verdict is what the playground shows. A GPU's compute dtype; fp32 on a CPU whatever the
    probe chose for training. In bf16 a greedy reply there depends on the padding of the batch it is decoded
    in (measured on an Intel Xeon with AMX: "Hi." decoded beside longer prompts answered differently from its
    13th token on), so batched replies (the verdict, `tuner eval`) would differ from the playground's; in fp32
    they are the same (tests/test_voicecheck.py), though a bf16 decoding step took half the time there
    (batches of 8-24 rows; `python -m tuner bench --only decode --decode-dtype bf16` measures both)."""
    from tuner.models import compute_dtype

    return compute_dtype(dev)


def describe(result: dict[str, Any]) -> str:
    """One line for a person: what was chosen and why, e.g. for the Train tab and the test header."""
    if result.get("bf16_ms") is None:
        return f"fp32 (this CPU has no bf16 kernels; a probe step took {result['fp32_ms']} ms)"
    return (f"{result['choice']} (measured on this CPU: a LoRA step takes {result['fp32_ms']} ms in fp32, "
            f"{result['bf16_ms']} ms in bf16, {result['bf16_speedup']}x)")
