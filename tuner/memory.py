"""GPU memory a run needs, from the model's config alone (no weights), and the chat models that fit a GPU.

The formula and the published figures it is held against are in docs/memory.md. Light module: no torch;
the GPU's own memory is read by tuner.models.gpu_memory_gib. Shapes of the recommended models are stored
here (from each model's config.json on the Hub), so the list and its figures work offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.config import Method, TrainConfig
from tuner.errors import ModelError

GIB = 2**30
# NF4 with double quantization (QLoRA paper, sec. 3): 4 bits a weight, an 8-bit scale per 64 weights and an
# fp32 scale per 256 of those: 4 + 8/64 + 32/(64*256) = 4.127 bits
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
HALF_BYTES = 2  # bf16/fp16: the compute dtype on a GPU, and what bitsandbytes leaves unquantized
ADAPTER_BYTES = 4 + 4 + 8  # a trainable fp32 weight, its gradient and AdamW's two moments
FULL_BYTES = 4 + 4 + 8  # full fine-tuning keeps fp32 master weights (tuner.train.recipe.precision)
# what one decoder layer keeps per token for the backward pass, in half-precision tensors, with attention that
# keeps no seq x seq matrix (SDPA/flash): ~10 hidden-wide (two norms' inputs, in fp32, and outputs, q/k/v, the
# attention output) and 4 intermediate-wide (gate, up, the activation, down's input); docs/memory.md
ACT_HIDDEN, ACT_INTER = 10, 4
# the loss: trl's SFTTrainer scores tokens with a fused LM head (trl.kernels.chunked_logprob) that never holds the
# [tokens, vocab] logits, only a tile of 4096 tokens x 32768 vocabulary entries at a time, plus per-token vectors
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
UNFUSED_LOGIT_BYTES = 2 + 4 + 4  # without it: bf16 logits, their fp32 upcast and log-softmax (docs/memory.md)
CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, kernels: outside torch's allocator
FRAGMENTATION = 0.10  # torch's caching allocator holds ~10% more than the live tensors at peak


@dataclass(frozen=True)
class Shape:
    """The numbers of a model's config.json that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False  # input and output embeddings share one matrix
    attention_bias: bool = False
    extra_params: int = 0  # parameters outside the decoder (a vision tower), kept in half precision

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_params(self) -> int:
        """Weights of the decoder's linear layers: what NF4 quantizes (bitsandbytes skips the LM head)."""
        h, i = self.hidden, self.intermediate
        attention = h * self.q_dim * 2 + h * self.kv_dim * 2
        return self.layers * (attention + 3 * h * i)  # gated MLP: gate, up, down

    def other_params(self) -> int:
        """Embeddings, LM head, norms, biases and any vision tower: kept in half precision."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return embeddings + norms + bias + self.extra_params

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear layer of the decoder (target_modules all-linear): rank x (in + out) each."""
        h, i = self.hidden, self.intermediate
        per_layer = (h + self.q_dim) * 2 + (h + self.kv_dim) * 2 + 3 * (h + i)
        return self.layers * rank * per_layer


def shape_from_config(config: dict[str, Any]) -> Shape:
    """A Shape from a config.json (multimodal configs keep the language model's under text_config)."""
    text = config.get("text_config") or config
    try:
        heads = int(text["num_attention_heads"])
        return Shape(layers=int(text["num_hidden_layers"]), hidden=int(text["hidden_size"]),
                     intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]), heads=heads,
                     kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=int(text.get("head_dim") or 0),
                     tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                     attention_bias=bool(text.get("attention_bias", text.get("model_type", "").startswith("qwen2"))))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"The model's config.json lacks what the memory estimate needs ({exc}).") from None


@dataclass(frozen=True)
class Recommended:
    hub_id: str
    published_params: float  # as the model card states it, to check the shape against
    shape: Shape


# The recommended chat models: numbers from each repository's config.json on the Hub (main branch, 2025),
# parameter counts from their model cards. Gemma 3 4B: the text config; its SigLIP vision tower (~0.42B) is extra.
RECOMMENDED: list[Recommended] = [
    Recommended("meta-llama/Llama-3.2-1B-Instruct", 1.24e9, Shape(16, 2048, 8192, 128256, 32, 8, 64, tied=True)),
    Recommended("Qwen/Qwen2.5-1.5B-Instruct", 1.54e9,
                Shape(28, 1536, 8960, 151936, 12, 2, 128, tied=True, attention_bias=True)),
    Recommended("HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.71e9, Shape(24, 2048, 8192, 49152, 32, 32, 64, tied=True)),
    Recommended("Qwen/Qwen2.5-3B-Instruct", 3.09e9,
                Shape(36, 2048, 11008, 151936, 16, 2, 128, tied=True, attention_bias=True)),
    Recommended("meta-llama/Llama-3.2-3B-Instruct", 3.21e9, Shape(28, 3072, 8192, 128256, 24, 8, 128, tied=True)),
    Recommended("microsoft/Phi-3.5-mini-instruct", 3.82e9, Shape(32, 3072, 8192, 32064, 32, 32, 96)),
    Recommended("google/gemma-3-4b-it", 4.3e9,
                Shape(34, 2560, 10240, 262208, 8, 4, 256, tied=True, extra_params=417_000_000)),
    Recommended("mistralai/Mistral-7B-Instruct-v0.3", 7.25e9, Shape(32, 4096, 14336, 32768, 32, 8, 128)),
    Recommended("Qwen/Qwen2.5-7B-Instruct", 7.62e9,
                Shape(28, 3584, 18944, 152064, 28, 4, 128, attention_bias=True)),
    Recommended("meta-llama/Llama-3.1-8B-Instruct", 8.03e9, Shape(32, 4096, 14336, 128256, 32, 8, 128)),
]
# the default model (SmolLM2-135M-Instruct), for planning without converting it first
DEFAULT_SHAPE = Shape(30, 576, 1536, 49152, 9, 3, 64, tied=True)

# GPUs people rent, by the memory torch reports for them (nvidia-smi's MiB): the tiers of the list
GPUS: list[tuple[str, float]] = [("T4 16 GB", 15.0), ("L4 / A10G 24 GB", 22.5), ("A100 40 GB", 40.0),
                                 ("A100 80 GB", 80.0)]


def recommended_shape(name: str) -> Shape | None:
    key = name.strip().lower()
    return next((r.shape for r in RECOMMENDED if r.hub_id.lower() == key), None)


def shape_of(name: str | None, download: bool = False) -> Shape | None:
    """The model's shape without loading weights: the stored table, a local folder's config.json, or a Hub id's
    config.json from the local cache (with `download`, from the Hub: one small file). None when unknown."""
    from tuner.models import check_reachable, in_hub_cache, is_default, is_hub_id

    if is_default(name):
        return DEFAULT_SHAPE
    assert name is not None
    stored = recommended_shape(name)
    if stored is not None:
        return stored
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text()))
    if not is_hub_id(name):
        return None
    cached = in_hub_cache(name)
    if cached is None and download:
        check_reachable(name)  # offline: says so
        from huggingface_hub import hf_hub_download

        try:
            cached = hf_hub_download(name, "config.json")
        except Exception as exc:  # unknown id, gated, no network: the same advice
            raise ModelError(f"Could not read the config of '{name}' from the Hub ({type(exc).__name__}): check "
                             "the id, your access to it and the network.") from exc
    return shape_from_config(json.loads(Path(cached).read_text())) if cached else None


def gradient_checkpointing_on(cfg: TrainConfig, params: int) -> bool:
    """As the run decides on a GPU (tuner.train.recipe.gradient_checkpointing)."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "on"
    return params > 1_000_000_000


def plan(shape: Shape, cfg: TrainConfig) -> dict[str, Any]:
    """Peak GPU memory of a run with these settings, in GiB, by part (docs/memory.md)."""
    b, s = cfg.batch_size, cfg.max_length
    gc = gradient_checkpointing_on(cfg, shape.params())
    if cfg.method is Method.FULL:
        weights, trainable = shape.params() * FULL_BYTES, 0
    else:
        per_weight = NF4_BYTES if cfg.uses_nf4() else HALF_BYTES
        weights = shape.linear_params() * per_weight + shape.other_params() * HALF_BYTES
        trainable = shape.lora_params(cfg.lora_r) * ADAPTER_BYTES
    layer = b * s * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * HALF_BYTES
    # with checkpointing only each layer's input is kept, and one layer's activations are rebuilt at a time
    activations = b * s * shape.hidden * HALF_BYTES * shape.layers + layer if gc else layer * shape.layers
    logits = loss_head_bytes(shape, b * s)
    live = weights + trainable + activations + logits
    parts = {"weights": weights, "adapter_and_optimizer": trainable, "activations": activations, "loss_head": logits,
             "overhead": CONTEXT_BYTES + FRAGMENTATION * live}
    return {"total_gib": round(sum(parts.values()) / GIB, 1), "gradient_checkpointing": gc,
            "parts_gib": {k: round(v / GIB, 2) for k, v in parts.items()},
            "params": shape.params(), "max_length": s, "batch_size": b,
            "quantization": "nf4" if cfg.method is Method.LORA and cfg.uses_nf4() else "none"}


def loss_head_bytes(shape: Shape, tokens: int) -> int:
    """The fused LM head: one bf16 tile, a bf16 slice of the head's weight, and the batch's hidden states copied
    (bf16) with their fp32 gradient."""
    vocab = min(shape.vocab, HEAD_VOCAB)
    return min(tokens, HEAD_TOKENS) * vocab * HALF_BYTES + vocab * shape.hidden * HALF_BYTES + tokens * shape.hidden * 6


def unfused_logits_bytes(shape: Shape, tokens: int) -> int:
    """What the logits would take if the loss were computed from the full [tokens, vocab] matrix (for comparison)."""
    return tokens * shape.vocab * UNFUSED_LOGIT_BYTES


def fits(shape: Shape, cfg: TrainConfig, gpu_gib: float) -> bool:
    return plan(shape, cfg)["total_gib"] <= gpu_gib


def recommended(cfg: TrainConfig, gpu_gib: float | None = None) -> list[dict[str, Any]]:
    """Every recommended model with the memory it needs at cfg's length and batch, the smallest GPU of GPUS it
    fits, and (with `gpu_gib`) whether it fits that GPU."""
    out = []
    for r in RECOMMENDED:
        need = plan(r.shape, TrainConfig.from_dict({**cfg.to_dict(), "base_model": r.hub_id}))
        smallest = next((name for name, gib in GPUS if need["total_gib"] <= gib), None)
        row = {"model": r.hub_id, "parameters": r.shape.params(), "needs_gib": need["total_gib"],
               "smallest_gpu": smallest, "gradient_checkpointing": need["gradient_checkpointing"]}
        if gpu_gib is not None:
            row["fits"] = need["total_gib"] <= gpu_gib
        out.append(row)
    return out


def _fitting(cfg: TrainConfig, shape: Shape, gpu_gib: float, name: str, values: list[Any]) -> Any | None:
    """The first of `values` for setting `name` that makes the run fit, if any."""
    for value in values:
        trial = TrainConfig.from_dict({**cfg.to_dict(), name: value})
        if fits(shape, trial, gpu_gib):
            return value
    return None


def check_fits(cfg: TrainConfig, gpu_gib: float, gpu_name: str = "this GPU") -> dict[str, Any] | None:
    """Raise ModelError before loading when the run will not fit `gpu_gib`, naming the settings that would fit.
    Returns the plan (None when the model's shape cannot be known offline: then nothing is refused)."""
    shape = shape_of(cfg.base_model)
    if shape is None:
        return None
    need = plan(shape, cfg)
    if need["total_gib"] <= gpu_gib:
        return need
    fixes = []
    batch = _fitting(cfg, shape, gpu_gib, "batch_size", [b for b in (16, 8, 4, 2, 1) if b < cfg.batch_size])
    if batch is not None:
        fixes.append(f"batch_size {batch} (now {cfg.batch_size}; raise grad_accum to keep the effective batch)")
    length = _fitting(cfg, shape, gpu_gib, "max_length",
                      [n for n in (4096, 2048, 1024, 512, 256) if n < cfg.max_length])
    if length is not None:
        fixes.append(f"max_length {length} (now {cfg.max_length})")
    if not need["gradient_checkpointing"] and fits(shape, TrainConfig.from_dict(
            {**cfg.to_dict(), "gradient_checkpointing": "on"}), gpu_gib):
        fixes.append("gradient_checkpointing on")
    if not cfg.uses_nf4() and cfg.method is Method.LORA and fits(shape, TrainConfig.from_dict(
            {**cfg.to_dict(), "quantization": "nf4"}), gpu_gib):
        fixes.append("quantization nf4")
    if not fixes:  # no one setting is enough: change them together, cheapest first
        together = _together(cfg, shape, gpu_gib)
        if together:
            fixes.append("together " + ", ".join(f"{k} {v}" for k, v in together.items()))
    smaller = [r for r in recommended(cfg, gpu_gib) if r["fits"] and r["parameters"] < need["params"]]
    if smaller:
        best = max(smaller, key=lambda r: r["parameters"])
        fixes.append(f"a smaller model such as {best['model']} (needs {best['needs_gib']} GiB)")
    advice = "; or ".join(fixes) if fixes else "no setting makes it fit: use a GPU with more memory"
    raise ModelError(
        f"'{cfg.base_model}' will not fit {gpu_name}: training it needs about {need['total_gib']} GiB "
        f"({describe(need)}) and {gpu_name} has {gpu_gib:.1f} GiB free. Fix: {advice}. "
        "The estimate is a formula (docs/memory.md), made before loading anything.")


def _together(cfg: TrainConfig, shape: Shape, gpu_gib: float) -> dict[str, Any]:
    """Settings changed one after another (checkpointing, 4-bit base, then halving batch and length) until the
    run fits; {} when even the smallest does not."""
    values = cfg.to_dict()
    steps: list[tuple[str, Any]] = [("gradient_checkpointing", "on")]
    if cfg.method is Method.LORA:
        steps.append(("quantization", "nf4"))
    steps += [("batch_size", b) for b in (8, 4, 2, 1)] + [("max_length", n) for n in (4096, 2048, 1024, 512, 256)]
    changed: dict[str, Any] = {}
    for name, value in steps:
        current = values[name]
        if (isinstance(value, int) and value >= current) or value == current or (name == "quantization"
                                                                                  and cfg.uses_nf4()):
            continue
        values[name] = changed[name] = value
        if fits(shape, TrainConfig.from_dict(values), gpu_gib):
            return changed
    return {}


def describe(need: dict[str, Any]) -> str:
    """The settings a plan is for, in words."""
    gc = "on" if need["gradient_checkpointing"] else "off"
    return (f"{'QLoRA' if need['quantization'] == 'nf4' else 'no quantization'}, max_length {need['max_length']}, "
            f"batch_size {need['batch_size']}, gradient checkpointing {gc}")
