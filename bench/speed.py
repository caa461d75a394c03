"""Speed: this project's default recipe against the plain TRL recipe, side by side, on this machine.

    python -m tuner bench                       # everything, 3 runs of each recipe, bench/results.json
    python -m tuner bench --only train --repeats 5 --tokens 6000
    python -m tuner bench --tokens 300 --repeats 1 --val-examples 2 --convert-n 200   # a smoke test

Training (`train`): the same data (a fixed, mixed-length subset built from the shipped Kettle & Co.
sample and converted by tuner.dataset), the same base model (the embedded default), the same LoRA
rank and targets and the same training tokens (one pass over the subset) for
  baseline  trl SFTTrainer + a plain SFTConfig (its own defaults: batch size, padding, gradient
            checkpointing, precision; only output_dir, max_steps, report_to and seeds are set) and
            peft_config=LoraConfig(r=16, target_modules="all-linear"), as the TRL docs show it;
  project   tuner.train.prepare_run + train_run with TrainConfig defaults (max_steps = one pass).
Runs alternate (A B A B ...), each in a fresh process so memory is its own; medians are reported.
Both adapters are scored by the same code on the same validation set (loss on assistant tokens,
and on all tokens). Utilisation is ~4 x base parameters x tokens (LoRA: forward + input gradients,
no weight gradients of the frozen base) over the train-step time, against a torch.matmul
microbenchmark in the run's compute dtype, measured in the same process right after training.

Also: `chat` (playground time to first token and tokens/s, one column vs a batched compare), `decode`
(tuner's playground, voice check and eval decoding vs llama.cpp on the run's own f16 GGUF, same prompts),
`convert` (converter conversations/s and peak memory on a generated export), `quick` (the quick
preset from pressing Train to the first tuned reply, model load included) and `profile`
(torch.profiler over a few train steps of the default recipe: where the time goes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tuner.errors import TunerError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "datasets" / "kettle_openai.jsonl"
DEFAULT_OUT = ROOT / "bench" / "results.json"
PARTS = ("train", "chat", "decode", "convert", "quick", "estimate", "profile")
DECODE_PROMPTS = 24  # the eval size: tuner's replies vs llama.cpp's, side by side
DEFAULT_TOKENS = 8000  # one pass over about 8k tokens: ~2 min per baseline run on a 2-core CPU
DEFAULT_VAL_EXAMPLES = 12
DEFAULT_CONVERT_N = 100_000
LORA_R, LORA_TARGETS = 16, "all-linear"  # the TRL docs' example; the project's defaults must match
GROUP_SIZES = (1, 1, 1, 2, 2, 3, 4, 6)  # sample conversations joined into one: 1 to 12 exchanges
CHAT_PROMPT = "Hi, my Galley kettle arrived with a dent in the lid. What can you do, and how long will it take?"
EVAL_LOSS_TOLERANCE = 0.02  # "equal eval loss within noise": project may be at most this much higher
ADAPTER_TARGET, VERDICT_TARGET = 2.5, 1.5  # issue 25: command to adapter, command to verdict, x as fast as plain TRL
ESTIMATE_TARGET = 0.25  # issue 25: the page's estimate after the first run on a machine, as a share of the real time


# -- data -----------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _grouped(convs: list[list[dict[str, Any]]], rng: random.Random) -> list[dict[str, Any]]:
    """Join consecutive conversations into multi-turn ones of mixed length (1 to 6 at a time)."""
    out, i = [], 0
    while i < len(convs):
        k = rng.choice(GROUP_SIZES)
        out.append({"messages": [m for conv in convs[i:i + k] for m in conv]})
        i += k
    return out


def mixed_exports(folder: Path, tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """Write train and validation exports (OpenAI JSONL) built from the shipped sample.

    Every sixth sample conversation goes to validation, the rest to training, so no exchange is in
    both. Training conversations are regrouped in seeded rounds until there is text for `tokens`.
    """
    if not SAMPLE.is_file():
        raise TunerError(f"{SAMPLE} is missing: the benchmark builds its data from the shipped sample.")
    convs = [row["messages"] for row in _read_jsonl(SAMPLE)]
    val_pool = convs[::6]
    train_pool = [c for i, c in enumerate(convs) if i % 6]
    folder.mkdir(parents=True, exist_ok=True)
    val_rows = _grouped(val_pool, random.Random(seed))
    train_rows: list[dict[str, Any]] = []
    chars_needed = tokens * 4 * 1.3 + 1  # ~4 characters a token, with room for duplicates dropped
    rounds = 0
    while sum(len(m["content"]) for r in train_rows for m in r["messages"]) < chars_needed and rounds < 50:
        pool = list(train_pool)
        if rounds:
            random.Random(seed + rounds).shuffle(pool)
        train_rows += _grouped(pool, random.Random(seed + 1000 + rounds))
        rounds += 1
    paths = folder / "bench_train_export.jsonl", folder / "bench_validation_export.jsonl"
    _write_jsonl(paths[0], train_rows)
    _write_jsonl(paths[1], val_rows)
    return paths


def chat_length(tokenizer, messages: list[dict[str, Any]], max_length: int = 1024) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return min(len(ids), max_length)


def prepare_data(work: Path, tokens: int, val_examples: int, seed: int = 0) -> dict[str, Any]:
    """Convert the mixed exports with tuner.dataset and keep a prefix of about `tokens` training tokens."""
    from tuner.config import ConvertConfig
    from tuner.dataset import convert
    from tuner.models import load_tokenizer

    tokenizer = load_tokenizer("default")
    train_export, val_export = mixed_exports(work / "exports", tokens, seed)
    cfg = ConvertConfig(val_fraction=0.0, seed=seed)
    reports = {name: convert([path], work / f"converted_{name}", cfg, tokenizer)
               for name, path in (("train", train_export), ("validation", val_export))}
    train_all = _read_jsonl(work / "converted_train" / "train.jsonl")
    val_all = _read_jsonl(work / "converted_validation" / "train.jsonl")
    if not train_all:
        raise TunerError("the converter kept no training conversation from the sample.")
    lengths_all = [chat_length(tokenizer, row["messages"]) for row in train_all]
    train, total = [], 0
    for row, n in zip(train_all, lengths_all, strict=True):  # file order keeps the mix of lengths
        if total + n > tokens * 1.05:
            continue  # would overshoot the budget: a shorter one may still fit
        train.append(row)
        total += n
        if total >= tokens * 0.95:
            break
    if not train:  # a budget below the shortest conversation: train on that one
        shortest = min(range(len(train_all)), key=lengths_all.__getitem__)
        train, total = [train_all[shortest]], lengths_all[shortest]
    val = val_all[:max(1, val_examples)]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data / "train.jsonl", train)
    _write_jsonl(data / "validation.jsonl", val)
    lengths = sorted(chat_length(tokenizer, r["messages"]) for r in train)
    turns = sorted(sum(m["role"] == "assistant" for m in r["messages"]) for r in train)
    return {
        "dir": str(data), "source": str(SAMPLE.relative_to(ROOT)), "train_examples": len(train),
        "train_tokens": total, "tokens_requested": tokens, "capped": total < tokens,
        "validation_examples": len(val), "validation_tokens": sum(chat_length(tokenizer, r["messages"]) for r in val),
        "example_tokens": {"min": lengths[0], "median": statistics.median(lengths), "max": lengths[-1]},
        "assistant_turns": {"min": turns[0], "median": statistics.median(turns), "max": turns[-1]},
        "converter_dropped": {k: len(r.get("dropped", [])) for k, r in reports.items()},
    }


def big_export(path: Path, n: int, seed: int = 0) -> int:
    """A generated help-desk export of `n` conversations (OpenAI JSONL) for the converter benchmark.

    Exchanges of the shipped sample are recombined (1 to 4 per conversation) with fresh ticket and
    order numbers, so conversations are distinct, as in a real export. Returns the file size.
    """
    convs = [row["messages"] for row in _read_jsonl(SAMPLE)]
    exchanges = [conv[i:i + 2] for conv in convs for i in range(0, len(conv) - 1, 2)]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            msgs = []
            for j, (user, reply) in enumerate(rng.choice(exchanges) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))):
                ref = f" (ticket {100000 + i}, order KC-{rng.randrange(10000, 99999)})" if j == 0 else ""
                msgs += [{"role": "user", "content": user["content"] + ref},
                         {"role": "assistant", "content": reply["content"]}]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path.stat().st_size


# -- measuring ------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def matmul_peak_flops(dtype_name: str, dev: str, seconds: float = 1.0) -> float:
    """Best achieved FLOP/s of a square torch.matmul in `dtype_name` (bf16, fp16, fp32) on `dev`."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    n = 8192 if dev == "cuda" else 2048
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    best = math.inf
    deadline = time.perf_counter() + seconds
    for i in range(1000):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call pays for kernel selection and page faults
            best = min(best, time.perf_counter() - t)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def dtype_of(precision: str) -> str:
    return "bf16" if "bf16" in precision else "fp16" if "fp16" in precision else "fp32"


def model_parameters(model_path: str) -> int:
    """Parameters of the base checkpoint, from the safetensors headers (tied embeddings counted once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names = fh.keys()  # a safe_open handle is not iterable itself
            for key in names:
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def eval_losses(model_path: str, adapter_dir: str, val_file: str, dev: str) -> dict[str, float]:
    """Mean cross-entropy of base + adapter on the validation set, on assistant tokens and on all tokens.

    The same code scores both recipes (fp32, one example at a time), so the numbers compare even
    though the baseline trains on every token and the project on replies only.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.templates import assistant_mask

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    sums = {"assistant": 0.0, "all": 0.0}
    counts = {"assistant": 0, "all": 0}
    with torch.no_grad():
        for row in _read_jsonl(Path(val_file)):
            input_ids, assistant_masks = assistant_mask(tokenizer, row["messages"])
            ids = torch.tensor([input_ids[:1024]], device=dev)
            mask = torch.tensor(assistant_masks[:1024], device=dev)[1:].bool()
            logits = model(input_ids=ids).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            sums["all"] += losses.sum().item()
            counts["all"] += losses.numel()
            sums["assistant"] += losses[mask].sum().item()
            counts["assistant"] += int(mask.sum().item())
    return {"eval_loss": round(sums["assistant"] / max(counts["assistant"], 1), 4),
            "eval_loss_all_tokens": round(sums["all"] / max(counts["all"], 1), 4)}


def _finish_train_result(spec: dict[str, Any], result: dict[str, Any], dev: str) -> dict[str, Any]:
    """Memory first (before scoring loads anything), then the shared eval, then the matmul peak."""
    import torch

    result["peak_rss_mb"] = peak_rss_mb()
    result["cuda_max_allocated_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                       if dev == "cuda" else None)
    result.update(eval_losses(spec["model_path"], result["adapter"], spec["val_file"], dev))
    result["tokens_per_s"] = round(result["tokens"] / result["train_s"], 2) if result["train_s"] else None
    flops = 4 * spec["parameters"] * result["tokens"] / result["train_s"] if result["train_s"] else 0.0
    peak = matmul_peak_flops(result["dtype"], dev)
    result.update(achieved_tflops=float(f"{flops / 1e12:.4g}"), peak_matmul_tflops=float(f"{peak / 1e12:.4g}"),
                  utilisation=round(flops / peak, 4), device=dev,
                  threads=torch.get_num_threads() if dev == "cpu" else None)
    return result


# -- workers (each runs in its own process) ----------------------------------------------------------


def step_clock():
    """A TrainerCallback timing the train steps (wall and process CPU seconds) and reading the trainer's
    count of real tokens (trl sums the attention mask: padding is not counted)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds = self.cpu_seconds = 0.0
            self.steps = self.logged_tokens = 0
            self.trainer = None  # the baseline sets it; tuner's runs report trl's num_tokens through on_log
            self._t = self._c = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.seconds += time.perf_counter() - self._t
            self.cpu_seconds += time.process_time() - self._c
            self.steps += 1

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                self.logged_tokens = int(logs["num_tokens"])

        def figures(self) -> dict[str, Any]:
            tokens = int(getattr(self.trainer, "_total_train_tokens", 0)) if self.trainer else self.logged_tokens
            return {"train_s": round(self.seconds, 2), "train_cpu_s": round(self.cpu_seconds, 2),
                    "steps": self.steps, "tokens": tokens,
                    "tokens_per_cpu_s": round(tokens / self.cpu_seconds, 2) if self.cpu_seconds else None}

    return StepClock()


def _worker_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The TRL quickstart recipe: plain SFTConfig, LoraConfig(r=16, all-linear), model from the folder."""
    started = time.perf_counter()
    import dataclasses

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from datasets import load_dataset

    dataset = load_dataset("json", data_files={"train": spec["train_file"]})["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    per_step = defaults["per_device_train_batch_size"] * defaults["gradient_accumulation_steps"]
    max_steps = math.ceil(len(dataset) / per_step)  # one pass: the same tokens as the project run
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    # on a CPU the default bf16=True refuses to start unless use_cpu=True, as its error message says
    cpu = {} if torch.cuda.is_available() else {"use_cpu": True}
    if spec.get("baseline_precision") == "fp32":  # bf16=False: TRL's default bf16 autocast crawls on a CPU
        cpu["bf16"] = False  # without bf16 units (AVX2 only: no step of 3 in 9 minutes), a user turns it off
    args = SFTConfig(output_dir=spec["out"], max_steps=max_steps, report_to="none", seed=spec["seed"],
                     data_seed=spec["seed"], **cpu)
    clock = step_clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA_R, target_modules=LORA_TARGETS), callbacks=[clock])
    clock.trainer = trainer
    trainer.train()
    adapter = str(Path(spec["out"]) / "adapter")
    trainer.save_model(adapter)
    saved_at = time.time()
    wall = time.perf_counter() - started
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32"
    result = {"recipe": "baseline", "wall_s": round(wall, 2), **clock.figures(),
              "batch_size": args.per_device_train_batch_size, "precision": precision, "dtype": dtype_of(precision),
              "gradient_checkpointing": bool(args.gradient_checkpointing), "batching": "padded (random order)",
              "quantization": "none", "learning_rate": args.learning_rate, "adapter": adapter,
              "adapter_saved_at": saved_at}
    return _finish_train_result(spec, result, dev)


def _project_process_setup() -> None:
    """What `python -m tuner train` does to its process before torch loads (thread wait policy)."""
    from tuner.cli import quiet_threads_env

    quiet_threads_env()


def _worker_project(spec: dict[str, Any]) -> dict[str, Any]:
    """This project's default recipe through its own code path (TrainConfig defaults)."""
    started = time.perf_counter()
    _project_process_setup()
    import torch

    from tuner.config import TrainConfig
    from tuner.runs import prepare_run, read_metrics
    from tuner.train import train_run

    cfg = TrainConfig(**spec.get("overrides", {}))
    if cfg.lora_r != LORA_R or cfg.target_modules != LORA_TARGETS:
        raise TunerError(f"TrainConfig defaults (r={cfg.lora_r}, {cfg.target_modules}) no longer match the "
                         f"baseline's LoRA (r={LORA_R}, {LORA_TARGETS}); update tuner.bench.")
    n = len(_read_jsonl(Path(spec["train_file"])))
    cfg.max_steps = spec.get("max_steps") or math.ceil(n / (cfg.batch_size * cfg.grad_accum))  # one pass
    run_dir = prepare_run(cfg, Path(spec["train_file"]).parent, Path(spec["out"]) / "run")
    clock = step_clock()
    status = train_run(run_dir, callbacks=[clock])
    verdict_at = time.time()  # train_run returns after the voice check, which follows the saved, checked adapter
    wall = time.perf_counter() - started
    if status.get("status") != "completed":
        raise TunerError(f"the project run failed: {status.get('error')}")
    records = [r for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    recorder_s, last = 0.0, 0
    for r in records:  # tuner's own recorder, as a cross-check of the clock: tokens per window / its step time
        recorder_s += (r["tokens"] - last) / r["tokens_per_s"]
        last = r["tokens"]
    dev = status.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = status.get("precision") or "fp32"
    result = {"recipe": spec.get("recipe", "project"), "overrides": spec.get("overrides", {}), "wall_s": round(wall, 2),
              **clock.figures(), "recorder_tokens": int(last), "recorder_train_s": round(recorder_s, 2),
              "batch_size": cfg.batch_size, "precision": precision, "dtype": dtype_of(precision),
              "gradient_checkpointing": bool(status.get("gradient_checkpointing")),
              "batching": status.get("batching"),
              "quantization": status.get("quantization") or cfg.quantization.value,
              "learning_rate": cfg.learning_rate, "adapter": status["adapter"], "run_dir": str(run_dir),
              "trainer_eval_loss": status.get("eval_loss"), "adapter_saved_at": status.get("saved_at") or verdict_at,
              "verdict_at": verdict_at if status.get("voice") else None, "voice_s": status.get("voice_s"),
              # the base's replies: decoded (first run of this base, prompts and settings) or from the cache
              "voice_base_replies": ((status.get("voice") or {}).get("timing") or {}).get("base_replies"),
              "voice_served_dtype": (status.get("voice") or {}).get("served_dtype"),
              # the base's evaluation before training: evaluated (first run of this base and validation set) or cached
              "base_eval": (status.get("base_eval") or {}).get("source")}
    return _finish_train_result(spec, result, dev)


def _worker_chat(spec: dict[str, Any]) -> dict[str, Any]:
    """Playground: one tuned column vs a batched base+tuned compare (peft mixed-adapter batch)."""
    from tuner.config import GenerationConfig
    from tuner.playground import BASE, TUNED, Playground

    t = time.perf_counter()
    pg = Playground()
    pg.load_run(spec["run_dir"])
    load_s = time.perf_counter() - t
    settings = GenerationConfig(max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    pg.timed_compare(spec["prompt"], [TUNED], settings)  # warm-up: first-call allocations
    single, compare = [], []
    for _ in range(spec["repeats"]):
        single.append(pg.timed_compare(spec["prompt"], [TUNED], settings)["timing"])
        compare.append(pg.timed_compare(spec["prompt"], [BASE, TUNED], settings)["timing"])

    def summary(timings: list[dict[str, Any]]) -> dict[str, Any]:
        return {"first_token_s": _median([x["first_token_s"] for x in timings]),
                "total_s": _median([x["total_s"] for x in timings]),
                "new_tokens": timings[-1]["new_tokens"],
                "tokens_per_s_per_column": _median([x["tokens_per_s_per_column"] for x in timings]),
                "tokens_per_s_all_columns": _median([x["tokens_per_s"] for x in timings])}

    s, c = summary(single), summary(compare)
    return {"load_s": round(load_s, 2), "max_new_tokens": spec["max_new_tokens"], "repeats": spec["repeats"],
            "device": pg.device, "single": s, "compare": c,
            # what comparing costs per generated token, relative to one column (1.0 = free)
            "compare_cost_per_token": round(s["tokens_per_s_per_column"] / c["tokens_per_s_per_column"], 3)
            if c["tokens_per_s_per_column"] else None,
            "peak_rss_mb": peak_rss_mb()}


def _worker_convert(spec: dict[str, Any]) -> dict[str, Any]:
    from tuner.config import ConvertConfig
    from tuner.dataset import convert

    rss_before = peak_rss_mb()
    load = _load()
    t, c = time.perf_counter(), time.process_time()
    report = convert([spec["export"]], spec["out"], ConvertConfig())
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c  # CPU: every thread, independent of load
    n = spec["n"]
    return {"conversations": n, "export_mb": round(spec["export_bytes"] / 2**20, 1), "elapsed_s": round(elapsed, 2),
            "cpu_s": round(cpu, 2), "load_average": [load, _load()],
            "conversations_per_s": round(n / elapsed, 1), "peak_rss_mb": peak_rss_mb(),
            "peak_rss_before_mb": rss_before, "train_examples": report["train_examples"],
            "validation_examples": report["validation_examples"],
            "dropped": len(report.get("dropped", [])), "ok": report["ok"]}


def _worker_quick(spec: dict[str, Any]) -> dict[str, Any]:
    """Press Train on the quick preset; as soon as the result is saved (before the run's voice check, which
    goes on beside), open the playground (model load included) and ask for the first reply, as a user can."""
    from tuner import jobs
    from tuner.config import GenerationConfig, TrainConfig
    from tuner.dataset import convert
    from tuner.playground import TUNED, Playground
    from tuner.runs import has_result, prepare_run, read_status

    convert([SAMPLE], Path(spec["out"]) / "data")  # the Data tab's work, done before Train is pressed
    overrides = {"max_steps": spec["max_steps"]} if spec.get("max_steps") else {}
    if spec.get("voice_prompts") is not None:
        overrides["voice_prompts"] = spec["voice_prompts"]
    cfg = TrainConfig.from_preset("quick", **overrides)
    estimate = jobs.estimate(cfg, Path(spec["out"]) / "data")  # what the Train tab promised before the press
    pressed = time.perf_counter()
    run_dir = prepare_run(cfg, Path(spec["out"]) / "data")
    job = jobs.start(run_dir)
    status = read_status(run_dir)
    while not has_result(status) and job.poll() is None:  # the Train tab's poll, tighter
        time.sleep(0.05)
        status = read_status(run_dir)
    saved = time.perf_counter()
    if not has_result(status):
        raise TunerError(f"the quick run saved no result: {job.wait(timeout=60).get('error')}")
    pg = Playground()
    pg.load_run(run_dir)
    loaded = time.perf_counter()
    timed = pg.timed_compare(spec["prompt"], [TUNED], GenerationConfig(max_new_tokens=spec["max_new_tokens"]))
    done = time.perf_counter()
    status = job.wait(timeout=3600)  # the voice check, which went on while the playground answered
    complete = time.perf_counter()
    if status.get("status") != "completed":
        raise TunerError(f"the quick run failed: {status.get('error')}")
    first = loaded - pressed + timed["timing"]["first_token_s"]
    return {"preset": "quick", "max_steps": status.get("max_steps"), "steps": status.get("step"),
            "train_examples": (status.get("data") or {}).get("train", {}).get("examples"),
            "press_to_saved_s": round(saved - pressed, 2), "playground_load_s": round(loaded - saved, 2),
            "first_token_s": round(timed["timing"]["first_token_s"], 2),
            "press_to_first_token_s": round(first, 2), "press_to_full_reply_s": round(done - pressed, 2),
            "press_to_complete_s": round(complete - pressed, 2), "voice_s": status.get("voice_s"),
            "reply_tokens": timed["timing"]["new_tokens"].get(TUNED),
            "first_eval_loss": status.get("first_eval_loss"), "eval_loss": status.get("eval_loss"),
            "train_wall_s": status.get("wall_s"), "job_peak_memory_mb": status.get("peak_memory_mb"),
            "precision": status.get("precision"), "target_s": 60,
            "estimated_s": round(estimate["time_s"], 1) if estimate.get("time_s") else None,
            "estimated_memory_mb": round(estimate["memory_mb"]) if estimate.get("memory_mb") else None,
            "reply": timed["replies"].get(TUNED, "")[:300]}


SOURCES = {"run": "the run before", "probe": "this CPU's precision probe", "reference": "reference speeds"}
ESTIMATE_PRESETS = ("standard", "standard", "quick")  # the same settings again, then others


def estimate_runs(presets: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(label, preset) per run: the first on a new machine, the same settings again, or other settings."""
    return [(("first" if i == 0 else "again" if p == presets[i - 1] else "other settings"), p)
            for i, p in enumerate(presets)]


def _worker_estimate(spec: dict[str, Any]) -> dict[str, Any]:
    """The Train tab's estimate against the real time, as a user meets it on a new machine: the shipped
    sample converted, then runs pressed one after another (ESTIMATE_RUNS: the standard preset twice, then the
    quick preset) in a home where nothing has run before. Each row: what the page estimated just before the
    press, and the press to the completed run (voice check included). The first is made from reference speeds;
    the others are learned from the run before them, which is what the issue's 25% is about."""
    from tuner import jobs
    from tuner.config import TrainConfig
    from tuner.dataset import convert
    from tuner.runs import prepare_run, read_status

    os.environ["TUNER_HOME"] = str(Path(spec["out"]) / "home")  # a machine where nothing has run yet
    data = Path(spec["out"]) / "data"
    convert([SAMPLE], data)
    rows = []
    for label, preset in estimate_runs(spec.get("presets") or ESTIMATE_PRESETS):
        overrides = {"max_steps": spec["max_steps"]} if spec.get("max_steps") else {}
        if spec.get("voice_prompts") is not None:
            overrides["voice_prompts"] = spec["voice_prompts"]
        cfg = TrainConfig.from_preset(preset, **overrides)
        said = jobs.estimate(cfg, data)  # as the Train tab asks: on a new CPU it measures the precision probe first
        pressed = time.perf_counter()
        run_dir = prepare_run(cfg, data)
        job = jobs.start(run_dir)
        status = job.wait(timeout=3600)
        real = time.perf_counter() - pressed
        if status.get("status") != "completed":
            raise TunerError(f"the {label} run failed: {status.get('error')}")
        status = read_status(run_dir)
        timing = (status.get("voice") or {}).get("timing") or {}
        est, real = said.get("time_s"), round(real, 1)  # the error from the figures the table shows
        rows.append({"run": label, "preset": preset, "steps": status.get("step"), "estimated_s": est,
                     "learned": bool(said.get("measured")), "source": said.get("source"),
                     "estimated_parts": said.get("breakdown"),
                     "real_s": real, "error": round(est / real - 1, 3) if est else None,
                     "real_parts": {k: status.get(k) for k in ("startup_s", "eval_s", "voice_s", "total_s")},
                     "base_replies": timing.get("base_replies")})
    return {"runs": rows, "load_average": _load()}


def decode_prompts(val_file: Path, n: int) -> list[list[dict[str, str]]]:
    """Up to `n` held-out prompts: each validation conversation cut before each of its agent replies."""
    prompts = []
    for row in _read_jsonl(val_file):
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        prompts += [msgs[:i] for i, m in enumerate(msgs) if m["role"] == "assistant" and i and msgs[i - 1]["role"] == "user"]
    return prompts[:n]


def _worker_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Decoding speed, side by side on the same prompts and the same run: tuner's playground (one prompt at a
    time, as a user chats), tuner's batched way (all tuned rows in one batch: the voice check; base+tuned in
    batches of EVAL_BATCH prompts: `tuner eval`), and llama.cpp on the run's own f16 GGUF (one prompt at a
    time, each reply as long as tuner's, so both write the same number of tokens)."""
    import llama_cpp

    from tuner.config import GenerationConfig
    from tuner.evaluate import EVAL_BATCH
    from tuner.gguf import export_gguf
    from tuner.playground import BASE, TUNED, Playground

    run_dir = spec["run_dir"]
    from tuner.runs import Run

    prompts = decode_prompts(Run(Path(run_dir)).data_file("validation.jsonl"), spec["prompts"])
    settings = GenerationConfig(max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    import torch

    t = time.perf_counter()
    pg = Playground(dtype=getattr(torch, spec["dtype"]) if spec.get("dtype") else None)
    pg.load_run(run_dir)
    load_s = time.perf_counter() - t
    pg.answers(prompts[:2], [TUNED], settings)  # warm-up: first-call allocations
    t = time.perf_counter()
    single = [pg.generate_many([p], [TUNED], settings)[0][TUNED] for p in prompts]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    batched, _ = pg.answers(prompts, [TUNED], settings)[TUNED]
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    evaluated = []
    for start in range(0, len(prompts), EVAL_BATCH):
        evaluated += pg.generate_many(prompts[start:start + EVAL_BATCH], [BASE, TUNED], settings)
    eval_s = time.perf_counter() - t
    tok = pg.tokenizer
    lengths = [len(tok(r, add_special_tokens=False)["input_ids"]) for r in single]
    eval_tokens = sum(len(tok(r[c], add_special_tokens=False)["input_ids"]) for r in evaluated for c in (BASE, TUNED))
    inputs = [tok(text, add_special_tokens=False)["input_ids"] for text in pg.prompt_texts(prompts, TUNED, settings)]
    dtype = str(pg.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    del pg

    t = time.perf_counter()
    gguf = export_gguf(run_dir, Path(spec["out"]) / "gguf", quant="f16")
    export_s = time.perf_counter() - t
    llm = llama_cpp.Llama(model_path=gguf["gguf"], n_ctx=4096, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    same = 0
    t = time.perf_counter()
    for ids, reply, n in zip(inputs, single, lengths, strict=True):
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) >= max(n, 1):
                break
        same += tok.decode(out, skip_special_tokens=True).strip() == reply.strip()
    llama_s = time.perf_counter() - t
    llm.close()
    tokens = sum(max(n, 1) for n in lengths)

    def side(seconds: float, n_tokens: int) -> dict[str, float]:
        return {"seconds": round(seconds, 2), "tokens": n_tokens, "tokens_per_s": round(n_tokens / seconds, 1),
                "x_llama_cpp_time_per_token": round((seconds / n_tokens) / (llama_s / tokens), 2)}

    return {"prompts": len(prompts), "max_new_tokens": spec["max_new_tokens"], "dtype": dtype,
            "playground_load_s": round(load_s, 2), "gguf_export_s": round(export_s, 1),
            "tuner_playground_one_at_a_time": side(single_s, sum(lengths)),
            "tuner_voice_check_one_batch": side(batched_s, sum(len(tok(r, add_special_tokens=False)["input_ids"])
                                                                for r in batched)),
            "tuner_eval_base_and_tuned": {**side(eval_s, eval_tokens), "batch_prompts": EVAL_BATCH},
            "llama_cpp_f16_one_at_a_time": side(llama_s, tokens),
            "same_replies_as_llama_cpp": same, "llama_cpp_python": llama_cpp.__version__,
            "batched_equals_one_at_a_time": sum(a == b for a, b in zip(batched, single, strict=True)),
            "peak_rss_mb": peak_rss_mb()}


PROFILE_CATEGORIES = (  # (category, substrings of op names), first match wins
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention", "efficient_attention", "_sdpa")),
    ("4-bit (de)quantization", ("bitsandbytes", "dequantize", "quantize_4bit", "int4")),
    ("matmul (linear layers + LoRA)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                                       "mkldnn", "onednn", "gemm")),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer (AdamW, grad clipping)", ("_foreach", "adam", "clip_grad", "norm_")),
    ("casts and copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                          "aten::cat", "aten::stack", "aten::index", "aten::fill_", "aten::zero_", "aten::empty")),
    ("embedding", ("embedding",)),
    ("elementwise, activations, norms", ("aten::mul", "aten::add", "aten::silu", "aten::rsqrt", "aten::pow",
                                         "aten::mean", "aten::neg", "aten::div", "aten::sub", "aten::sum",
                                         "aten::exp", "aten::where", "aten::sigmoid", "aten::tanh",
                                         "aten::threshold", "aten::dropout", "aten::native_dropout",
                                         "aten::bernoulli", "backward", "aten::sin", "aten::cos")),
)


def _category(name: str) -> str:
    low = name.lower()
    for category, keys in PROFILE_CATEGORIES:
        if any(k.lower() in low for k in keys):
            return category
    return "other torch ops"


def _worker_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """The default recipe's own code path, with torch.profiler attached to a few train steps.

    train_run builds its trainer inside; the profiler callback is attached to it in this process
    only (measurement, not a change of the recipe).
    """
    _project_process_setup()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from tuner.config import TrainConfig
    from tuner.runs import prepare_run
    from tuner.train import train_run

    first, count = spec["skip_steps"], spec["steps"]
    found: dict[str, Any] = {}

    class ProfileSteps(TrainerCallback):
        prof = None
        t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first and self.prof is None:
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=acts)
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == first + count:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                found["wall_s"] = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                found["averages"] = self.prof.key_averages()
                self.prof = None

    cfg = TrainConfig(**spec.get("overrides", {}))
    cfg.max_steps = first + count
    run_dir = prepare_run(cfg, Path(spec["train_file"]).parent, Path(spec["out"]) / "run")
    status = train_run(run_dir, callbacks=[ProfileSteps()])
    if "averages" not in found:
        raise TunerError(f"the profiled run did not reach step {first + count}: {status.get('error')}")
    cuda = torch.cuda.is_available()
    rows = []
    for avg in found["averages"]:
        t = (avg.self_device_time_total if cuda else avg.self_cpu_time_total) / 1e6
        rows.append((avg.key, t, avg.count))
    total = sum(t for _, t, _ in rows) or 1e-9
    rows.sort(key=lambda r: -r[1])
    categories: dict[str, float] = {}
    for key, t, _ in rows:
        categories[_category(key)] = categories.get(_category(key), 0.0) + t
    wall = found["wall_s"]
    return {"overrides": spec.get("overrides", {}), "steps": count, "after_step": first, "wall_s": round(wall, 2), "device": "cuda" if cuda else "cpu",
            "precision": status.get("precision"),
            "quantization": status.get("quantization") or cfg.quantization.value,
            "batching": status.get("batching"), "gradient_checkpointing": status.get("gradient_checkpointing"),
            "op_time_s": round(total, 2),
            # CPU: what the step's wall time spent outside torch ops (Python, Trainer, data collation)
            "outside_ops_pct": round(100 * max(wall - total, 0.0) / wall, 1) if not cuda and wall else None,
            "categories": sorted(({"category": k, "pct": round(100 * v / total, 1), "s": round(v, 2)}
                                  for k, v in categories.items()), key=lambda r: -r["pct"]),
            "top_ops": [{"op": k, "pct": round(100 * t / total, 1), "s": round(t, 3), "calls": c}
                        for k, t, c in rows[:15]]}


WORKERS = {"baseline": _worker_baseline, "project": _worker_project, "chat": _worker_chat, "decode": _worker_decode,
           "convert": _worker_convert, "quick": _worker_quick, "estimate": _worker_estimate,
           "profile": _worker_profile}


def run_worker(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result_file"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


# -- the parent: scheduling, medians, report --------------------------------------------------------


def _median(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    median = statistics.median(nums)
    # whole counts stay whole; other figures keep six significant digits, not four decimals
    # (a utilisation of 0.02995 must not read 0.03)
    return median if float(median).is_integer() else float(f"{median:.6g}")


class Bench:
    """Runs workers in fresh processes under a private TUNER_HOME that shares the model cache."""

    def __init__(self, work: Path, verbose: bool = True):
        from tuner.paths import models_dir

        self.work = work
        self.verbose = verbose
        self.env = {**os.environ, "TUNER_HOME": str(work / "home"), "TUNER_MODELS_DIR": str(models_dir()),
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.count = 0

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def run(self, kind: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.count += 1
        name = f"{self.count:02d}-{kind}"
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "kind": kind, "out": str(folder), "result_file": str(folder / "result.json")}
        spec_file = folder / "spec.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        log = folder / "worker.log"
        t, spawned = time.perf_counter(), time.time()
        with open(log, "w") as fh:
            try:
                proc = subprocess.run([sys.executable, "-m", "tuner", "bench", "--worker", str(spec_file)],
                                      env=self.env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                      cwd=str(ROOT))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0 or not (folder / "result.json").is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise TunerError(f"bench worker {name} failed (exit {code}); log: {log}\n{tail}")
        result = json.loads((folder / "result.json").read_text())
        result["process_s"] = round(time.perf_counter() - t, 2)
        if result.get("adapter_saved_at"):  # what the user waits for: the command's start to a saved adapter
            result["whole_process_s"] = round(result["adapter_saved_at"] - spawned, 2)
        if result.get("verdict_at"):  # tuner only: on to the voice verdict, work the plain recipe never does
            result["verdict_process_s"] = round(result["verdict_at"] - spawned, 2)
        return result


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    cuda = torch.cuda.is_available()
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": None, "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(Exception):
        from tuner.precision import cpu_info, for_model

        info["cpu_flags"] = cpu_info()["flags"]
        choice = for_model("default")
        info["cpu_precision"] = {k: choice.get(k) for k in ("choice", "fp32_ms", "bf16_ms", "bf16_speedup")}
    return info


def command_line() -> str:
    """This invocation as `python -m tuner bench ...` (also when started through bench/run_bench.py)."""
    import shlex

    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1:]
    return " ".join(["python -m tuner bench", *map(shlex.quote, argv)])


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


TRAIN_METRICS = ("whole_process_s", "verdict_process_s", "voice_s", "tokens_per_s", "tokens_per_cpu_s", "wall_s", "train_s", "train_cpu_s", "peak_rss_mb", "cuda_max_allocated_mb", "eval_loss",
                 "eval_loss_all_tokens", "achieved_tflops", "peak_matmul_tflops", "utilisation", "tokens", "steps")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`name:key=value,key=value` -> (name, TrainConfig overrides), e.g. `fp32:precision=fp32`."""
    from tuner.config import TrainConfig

    name, _, body = text.partition(":")
    if not name or not body or name in ("baseline", "project"):
        raise TunerError(f"--variant '{text}': write NAME:key=value[,key=value], NAME not baseline/project.")
    overrides: dict[str, Any] = {}
    for item in body.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in TrainConfig.help():
            raise TunerError(f"--variant '{text}': unknown TrainConfig setting '{key}'.")
        for cast in (int, float):
            with contextlib.suppress(ValueError):
                value = cast(value)
                break
        overrides[key] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    TrainConfig(**overrides)  # validates now, not in the middle of the benchmark
    return name, overrides


def bench_train(b: Bench, data: dict[str, Any], repeats: int, model_path: str, params: int,
                variants: dict[str, dict[str, Any]] | None = None, baseline_precision: str = "trl-default") -> dict[str, Any]:
    spec = {"model_path": model_path, "train_file": str(Path(data["dir"]) / "train.jsonl"),
            "val_file": str(Path(data["dir"]) / "validation.jsonl"), "parameters": params, "seed": 42,
            "baseline_precision": baseline_precision}
    recipes = ["baseline", "project", *(variants or {})]
    runs: list[dict[str, Any]] = []
    total = len(recipes) * repeats
    for i in range(repeats):
        for j, recipe in enumerate(recipes):  # alternate, so drifting machine load hits every recipe alike
            b.say(f"[train {i * len(recipes) + j + 1}/{total}] {recipe} ...")
            worker = "baseline" if recipe == "baseline" else "project"
            extra = {"recipe": recipe, "overrides": variants[recipe]} if recipe not in ("baseline", "project") else {}
            r = b.run(worker, {**spec, **extra})
            r["repeat"] = i + 1
            r["load_average"] = _load()
            runs.append(r)
            b.say(f"    {r['tokens']} tokens, {r['tokens_per_s']} tok/s, wall {r['wall_s']} s, "
                  f"RSS {r['peak_rss_mb']} MB, eval loss {r['eval_loss']} (all tokens {r['eval_loss_all_tokens']}), "
                  f"utilisation {100 * r['utilisation']:.1f}%")
    medians = {recipe: {m: _median([r.get(m) for r in runs if r["recipe"] == recipe]) for m in TRAIN_METRICS}
               for recipe in recipes}

    def ratios(recipe: str) -> dict[str, float | None]:
        out = {}
        for m in TRAIN_METRICS:
            # the plain recipe gives no verdict: tuner's time to its verdict is set against the baseline's whole process
            a, p = medians["baseline"]["whole_process_s" if m == "verdict_process_s" else m], medians[recipe][m]
            out[m] = round(p / a, 3) if isinstance(a, (int, float)) and isinstance(p, (int, float)) and a else None
        return out

    base_losses = [r["eval_loss"] for r in runs if r["recipe"] == "baseline"]
    tolerance = max(max(base_losses) - min(base_losses), EVAL_LOSS_TOLERANCE)
    ratio = ratios("project")
    speedup = ratio["tokens_per_s"] or 0.0
    # whole process: lower is better, so the speedup is baseline time / project time
    whole = round(1 / ratio["whole_process_s"], 3) if ratio.get("whole_process_s") else None
    to_verdict = round(1 / ratio["verdict_process_s"], 3) if ratio.get("verdict_process_s") else None
    loss_ok = medians["project"]["eval_loss"] <= medians["baseline"]["eval_loss"] + tolerance
    # the first project run meets a machine where nothing of this base is cached yet (the 4-bit copy, its evaluation
    # before training, its replies to the held-out questions); later runs take those from the caches
    first = next((r for r in runs if r["recipe"] == "project"), None)
    base_whole = medians["baseline"]["whole_process_s"]
    first_run = None
    if first and base_whole:
        first_run = {"whole_process_s": first.get("whole_process_s"), "verdict_process_s": first.get("verdict_process_s"),
                     "whole_process_speedup": round(base_whole / first["whole_process_s"], 3),
                     "to_verdict_speedup": (round(base_whole / first["verdict_process_s"], 3)
                                            if first.get("verdict_process_s") else None),
                     "base_replies": first.get("voice_base_replies"), "base_eval": first.get("base_eval")}
    settings = {r["recipe"]: {k: r.get(k) for k in ("precision", "quantization", "gradient_checkpointing",
                                                     "batching", "batch_size", "learning_rate", "threads",
                                                     "overrides")}
                for r in runs}
    return {"recipes": recipes, "repeats": repeats, "runs": runs, "medians": medians, "ratio": ratio,
            "baseline_precision": baseline_precision, "variant_ratios": {v: ratios(v) for v in recipes[2:]}, "settings": settings,
            "verdict": {"tokens_per_s_ratio": speedup, "whole_process_speedup": whole, "to_verdict_speedup": to_verdict,
                        "eval_loss_ok": bool(loss_ok),
                        "meets_whole_2x": bool(whole and whole >= 2 and loss_ok),
                        # the targets: command to adapter >= 2.5x, command to verdict >= 1.5x, no worse eval loss
                        "meets_adapter_target": bool(whole and whole >= ADAPTER_TARGET and loss_ok),
                        "meets_verdict_target": bool(to_verdict and to_verdict >= VERDICT_TARGET and loss_ok),
                        "eval_loss_tolerance": round(tolerance, 4), "first_run": first_run,
                        "meets_3x": bool(speedup >= 3 and loss_ok), "meets_2x": bool(speedup >= 2 and loss_ok)}}


def _run_for_chat(b: Bench, data: dict[str, Any], model_path: str, params: int, train: dict[str, Any] | None) -> str:
    """A completed project run: the last one the train part made, or a short one made now."""
    if train:
        for r in reversed(train["runs"]):
            if r["recipe"] == "project" and r.get("run_dir"):
                return r["run_dir"]
    spec = {"model_path": model_path, "train_file": str(Path(data["dir"]) / "train.jsonl"),
            "val_file": str(Path(data["dir"]) / "validation.jsonl"), "parameters": params, "seed": 42,
            "max_steps": 2}
    b.say("[chat] training a short run to chat with ...")
    return b.run("project", spec)["run_dir"]


def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tuner.models import default_checkpoint

    parts = args.only or list(PARTS)
    b = Bench(work, verbose=not args.quiet)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_average_start": _load(),
        "parts": parts,
    }
    model_path = str(default_checkpoint())
    params = model_parameters(model_path)
    results["model"] = {"name": "default (embedded SmolLM2-135M-Instruct)", "path": model_path, "parameters": params,
                        "lora": {"r": LORA_R, "target_modules": LORA_TARGETS}}
    data = None
    if {"train", "chat", "decode", "profile"} & set(parts):
        b.say("[data] building the benchmark data from the shipped sample ...")
        data = prepare_data(work / "bench_data", args.tokens, args.val_examples)
        results["data"] = data
        b.say(f"    {data['train_examples']} training conversations, {data['train_tokens']} tokens "
              f"({data['example_tokens']['min']}-{data['example_tokens']['max']} each); "
              f"{data['validation_examples']} validation conversations")
    if "train" in parts:
        variants = dict(parse_variant(v) for v in args.variant or [])
        results["train"] = bench_train(b, data, args.repeats, model_path, params, variants, args.baseline_precision)
    if "chat" in parts:
        run_dir = _run_for_chat(b, data, model_path, params, results.get("train"))
        b.say("[chat] playground: one column vs compare ...")
        results["chat"] = b.run("chat", {"run_dir": run_dir, "prompt": CHAT_PROMPT, "repeats": args.repeats,
                                         "max_new_tokens": args.chat_tokens})
    if "decode" in parts:
        run_dir = _run_for_chat(b, data, model_path, params, results.get("train"))
        b.say(f"[decode] tuner (playground, voice check, eval) vs llama.cpp on the run's f16 GGUF, "
              f"{args.decode_prompts} prompts ...")
        results["decode"] = b.run("decode", {"run_dir": run_dir, "prompts": args.decode_prompts,
                                             "max_new_tokens": args.decode_tokens,
                                             "dtype": args.decode_dtype})
    if "convert" in parts:
        export = work / "convert_export.jsonl"
        b.say(f"[convert] generating a {args.convert_n}-conversation export ...")
        size = big_export(export, args.convert_n)
        b.say("[convert] converting it ...")
        results["convert"] = b.run("convert", {"export": str(export), "n": args.convert_n, "export_bytes": size})
    if "quick" in parts:
        b.say("[quick] quick preset: Train pressed -> first tuned reply ...")
        results["quick"] = b.run("quick", {"prompt": CHAT_PROMPT, "max_new_tokens": args.chat_tokens,
                                           "max_steps": args.quick_steps, "voice_prompts": args.quick_voice_prompts})
    if "estimate" in parts:
        b.say(f"[estimate] the Train tab's estimate vs the real time, runs in a new home: "
              f"{', '.join(args.estimate_presets or ESTIMATE_PRESETS)} ...")
        results["estimate"] = b.run("estimate", {"max_steps": args.estimate_steps, "presets": args.estimate_presets,
                                                 "voice_prompts": args.estimate_voice_prompts})
    if "profile" in parts:
        b.say(f"[profile] default recipe, {args.profile_steps} steps under torch.profiler ...")
        variants = dict(parse_variant(v) for v in args.variant or [])
        if args.profile_variant and args.profile_variant not in variants:
            raise TunerError(f"--profile-variant {args.profile_variant}: no --variant of that name.")
        results["profile"] = b.run("profile", {"train_file": str(Path(data["dir"]) / "train.jsonl"),
                                               "skip_steps": 1, "steps": args.profile_steps,
                                               "overrides": variants.get(args.profile_variant, {})})
    results["load_average_end"] = _load()
    results["bench_s"] = round(time.perf_counter() - started, 1)
    return results


# -- output ---------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


TABLE_ROWS = (  # (label, metric, digits)
    ("whole process: command start to saved adapter (s)", "whole_process_s", 1),
    ("command start to the voice verdict (s; the baseline gives none, ratio to its saved adapter)",
     "verdict_process_s", 1),
    ("the voice check, adapter saved to verdict (s)", "voice_s", 1),
    ("training tokens/s (real tokens)", "tokens_per_s", 1),
    ("training tokens per CPU-second (load-independent)", "tokens_per_cpu_s", 1),
    ("in-process time, training run start to end (s)", "wall_s", 1),
    ("time in train steps (s)", "train_s", 1),
    ("CPU time in train steps (s)", "train_cpu_s", 1),
    ("peak RSS (MB)", "peak_rss_mb", 0),
    ("CUDA max allocated (MB)", "cuda_max_allocated_mb", 0),
    ("eval loss, assistant tokens", "eval_loss", 4),
    ("eval loss, all tokens", "eval_loss_all_tokens", 4),
    ("achieved TFLOP/s (4 x params x tokens)", "achieved_tflops", 4),
    ("peak matmul TFLOP/s (run's dtype)", "peak_matmul_tflops", 3),
    ("utilisation", "utilisation", 4),
    ("training tokens", "tokens", 0),
    ("optimizer steps", "steps", 0),
)


def _label(recipe: str, baseline_precision: str = "trl-default") -> str:
    baseline = "baseline (TRL, fp32)" if baseline_precision == "fp32" else "baseline (TRL defaults)"
    return {"baseline": baseline, "project": "project default"}.get(recipe, f"variant `{recipe}`")


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (printed, and pasted into bench/README.md)."""
    out = []
    m = results["machine"]
    out.append(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')}, device {m['device']}; "
               f"load average {results.get('load_average_start')} -> {results.get('load_average_end')}; "
               f"{results['date']}.  ")
    prec = m.get("cpu_precision") or {}
    if m["device"] == "cpu":
        out.append(f"CPU flags: {' '.join(m.get('cpu_flags') or []) or 'n/a'}; precision chosen by the probe: "
                   f"{prec.get('choice')} (a LoRA step {prec.get('fp32_ms')} ms fp32, {prec.get('bf16_ms')} ms bf16).  ")
    out.append(f"Command: `{results['command']}`")
    if "train" in results:
        t = results["train"]
        timed = t.get("baseline_precision", "trl-default")  # which TRL recipe ran: its defaults, or fp32
        d = results["data"]
        out += ["", f"Training: {d['train_examples']} conversations, {d['train_tokens']} tokens "
                f"({d['example_tokens']['min']}-{d['example_tokens']['max']} tokens, "
                f"{d['assistant_turns']['min']}-{d['assistant_turns']['max']} replies each), one pass; "
                f"validation {d['validation_examples']} conversations. Medians of "
                f"{t['repeats']} alternating runs each.", "",
                "| metric | " + " | ".join(_label(r, timed) for r in t["recipes"]) + " | project / baseline |",
                "|---|" + "---:|" * (len(t["recipes"]) + 1)]
        for label, key, digits in TABLE_ROWS:
            values = [t["medians"][r].get(key) for r in t["recipes"]]
            if all(v is None for v in values):
                continue
            out.append(f"| {label} | " + " | ".join(_fmt(v, digits) for v in values)
                       + f" | {_fmt(t['ratio'].get(key), 2)} |")
        out += ["", "| setting | " + " | ".join(_label(r, timed) for r in t["recipes"]) + " |",
                "|---|" + "---|" * len(t["recipes"])]
        for k in ("precision", "quantization", "gradient_checkpointing", "batching", "batch_size", "learning_rate"):
            out.append(f"| {k} | " + " | ".join(str(t["settings"][r].get(k)) for r in t["recipes"]) + " |")
        for name, r in t["variant_ratios"].items():
            out.append(f"\nVariant `{name}` ({t['settings'][name]['overrides']}): {_fmt(r['tokens_per_s'])}x "
                       f"baseline tokens/s, eval loss {_fmt(t['medians'][name]['eval_loss'], 4)}.")
        v = t["verdict"]
        if v.get("to_verdict_speedup"):
            out += ["", f"Targets, against {_label('baseline', timed)}: command "
                    f"to adapter {_fmt(v['whole_process_speedup'])}x (>= {ADAPTER_TARGET}x: "
                    f"{'met' if v.get('meets_adapter_target') else 'not met'}); command to the voice verdict "
                    f"{_fmt(v['to_verdict_speedup'])}x (>= {VERDICT_TARGET}x: "
                    f"{'met' if v.get('meets_verdict_target') else 'not met'}); eval loss "
                    f"{'no worse' if v['eval_loss_ok'] else 'WORSE'}."]
        f = v.get("first_run")
        if f and t["repeats"] > 1:
            out += ["", f"The first project run, on a machine where nothing of this base was cached yet (its 4-bit copy "
                    f"made, its loss before training {f['base_eval'] or 'n/a'}, its replies to the held-out questions "
                    f"{f['base_replies'] or 'n/a'}): command to adapter {_fmt(f['whole_process_s'], 1)} s "
                    f"({_fmt(f['whole_process_speedup'])}x), to the verdict {_fmt(f['verdict_process_s'], 1)} s "
                    f"({_fmt(f['to_verdict_speedup'])}x). The medians above include the runs after it, which take "
                    f"these from the machine's caches as every later run of a user does."]
        out += ["", f"Verdict: whole process (command start to saved adapter) {_fmt(v.get('whole_process_speedup'))}x "
                f"faster than the baseline (>= 2x: {'yes' if v.get('meets_whole_2x') else 'no'}); "
                + (f"with the voice verdict, which the baseline does not give, {_fmt(v['to_verdict_speedup'])}x; "
                   if v.get("to_verdict_speedup") else "")
                + f"in-step project/baseline tokens/s = {v['tokens_per_s_ratio']:.2f}x; eval loss "
                f"{'equal or lower' if v['eval_loss_ok'] else 'HIGHER'} (tolerance {v['eval_loss_tolerance']}); "
                f">= 3x: {'yes' if v['meets_3x'] else 'no'}; >= 2x: {'yes' if v['meets_2x'] else 'no'}."]
    if "chat" in results:
        c = results["chat"]
        out += ["", f"Playground ({c['device']}, greedy, up to {c['max_new_tokens']} new tokens, model load "
                f"{c['load_s']} s):", "",
                "| mode | time to first token (s) | tokens/s per column | tokens/s all columns |", "|---|---:|---:|---:|",
                f"| one column (tuned) | {_fmt(c['single']['first_token_s'])} | "
                f"{_fmt(c['single']['tokens_per_s_per_column'], 1)} | {_fmt(c['single']['tokens_per_s_all_columns'], 1)} |",
                f"| compare (base + tuned, one batch) | {_fmt(c['compare']['first_token_s'])} | "
                f"{_fmt(c['compare']['tokens_per_s_per_column'], 1)} | "
                f"{_fmt(c['compare']['tokens_per_s_all_columns'], 1)} |",
                "", f"Compare costs {_fmt(c['compare_cost_per_token'])}x one column per generated token."]
    if "decode" in results:
        d = results["decode"]
        out += ["", f"Decoding, the same {d['prompts']} held-out prompts and the same run (tuner serving {d['dtype']}; "
                f"llama.cpp {d['llama_cpp_python']} on the run's own f16 GGUF, each reply as long as tuner's; greedy, "
                f"up to {d['max_new_tokens']} new tokens):", "",
                "| who | how | seconds | tokens | tokens/s | time per token vs llama.cpp |", "|---|---|---:|---:|---:|---:|"]
        for name, how in (("tuner_playground_one_at_a_time", "playground, one prompt at a time"),
                          ("tuner_voice_check_one_batch", "voice check: every prompt in one batch (tuned)"),
                          ("tuner_eval_base_and_tuned", f"`tuner eval`: base + tuned, {d['tuner_eval_base_and_tuned']['batch_prompts']} prompts a batch"),
                          ("llama_cpp_f16_one_at_a_time", "llama.cpp, one prompt at a time")):
            r = d[name]
            out.append(f"| {'llama.cpp' if name.startswith('llama') else 'tuner'} | {how} | {_fmt(r['seconds'], 1)} | "
                       f"{r['tokens']} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['x_llama_cpp_time_per_token'])}x |")
        out += ["", f"Batched replies equal to one-at-a-time replies: {d['batched_equals_one_at_a_time']} of "
                f"{d['prompts']}; identical to llama.cpp's: {d['same_replies_as_llama_cpp']} (for information only: llama.cpp "
                "runs f16 weights and without tuner's repetition penalty, so its words differ; the lengths are the same)."]
    if "convert" in results:
        c = results["convert"]
        out += ["", f"Converter: {c['conversations']} generated conversations ({c['export_mb']} MB OpenAI JSONL) in "
                f"{c['elapsed_s']} s = **{c['conversations_per_s']:.0f} conversations/s**, peak RSS "
                f"{c['peak_rss_mb']:.0f} MB ({c['peak_rss_before_mb']:.0f} MB before converting); "
                f"{c.get('cpu_s')} s of CPU time in all threads; load average {c.get('load_average')}."]
    if "quick" in results:
        q = results["quick"]
        out += ["", f"Quick preset ({q['steps']} steps, {q['precision']}): Train pressed -> adapter saved "
                f"{q['press_to_saved_s']} s; playground load {q['playground_load_s']} s; first token "
                f"{q['first_token_s']} s: **{q['press_to_first_token_s']} s to the first tuned token** "
                f"(full reply at {q['press_to_full_reply_s']} s; target <= {q['target_s']} s), while the run's "
                f"voice check went on beside ({_fmt(q.get('voice_s'))} s; run complete at {q['press_to_complete_s']} s). "
                f"Eval loss {_fmt(q['first_eval_loss'], 3)} -> {_fmt(q['eval_loss'], 3)}."]
        if q.get("estimated_s"):
            out[-1] += (f" The Train tab's estimate beforehand: {q['estimated_s']} s to the complete run"
                        + (f", {q['estimated_memory_mb']} MB peak" if q.get("estimated_memory_mb") else "")
                        + f" (measured {q['press_to_complete_s']} s, {_fmt(q.get('job_peak_memory_mb'), 0)} MB).")
    if "estimate" in results:
        e = results["estimate"]["runs"]
        out += ["", "The Train tab's estimate against the real time (Train pressed to the run complete, voice check "
                "included), runs one after another on a machine where none had run:", "",
                "| run | preset | steps | estimate (s) | from | real (s) | error | voice check: base replies |",
                "|---|---|---:|---:|---|---:|---:|---|"]
        for r in e:
            err = f"{100 * r['error']:+.0f}%" if r.get("error") is not None else "n/a"
            out.append(f"| {r['run']} | {r['preset']} | {r['steps']} | {_fmt(r['estimated_s'], 1)} | "
                       f"{SOURCES.get(r.get('source'), 'reference speeds')} | {r['real_s']} | {err} | "
                       f"{r.get('base_replies') or 'n/a'} |")
        learned = [abs(r["error"]) for r in e if r["learned"] and r.get("error") is not None]
        if learned:
            out += ["", f"Learned estimates within {100 * max(learned):.0f}% of the real time (target 25%: "
                    f"{'met' if max(learned) <= ESTIMATE_TARGET else 'not met'})."]
    if "profile" in results:
        p = results["profile"]
        out += ["", f"Profile of the default recipe ({p['steps']} train steps after step {p['after_step']}, "
                f"{p['device']}, {p['precision']}, {p['batching']}): {p['wall_s']} s wall, {p['op_time_s']} s in "
                "torch ops" + (f"; {p['outside_ops_pct']}% of the wall time outside torch ops" if
                               p.get("outside_ops_pct") is not None else "") + ".", "",
                "| category | % of op time |", "|---|---:|"]
        out += [f"| {r['category']} | {r['pct']} |" for r in p["categories"]]
        out += ["", "| top ops (self time) | % | calls |", "|---|---:|---:|"]
        out += [f"| `{r['op']}` | {r['pct']} | {r['calls']} |" for r in p["top_ops"][:10]]
    return "\n".join(out)


# -- command line ---------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each recipe (alternating); medians reported.")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help="Training-token budget of each run (one pass over a subset of about this many).")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="Run only this part (repeatable); default: all of " + ", ".join(PARTS) + ". "
                             "`--only voice` runs the voice benchmark (bench/voice.py) with its own flags.")
    parser.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="Also time the project recipe with these TrainConfig overrides (repeatable), "
                             "e.g. fp32:precision=fp32. Levers are measured, not assumed.")
    parser.add_argument("--baseline-precision", choices=("trl-default", "fp32"), default="trl-default",
                        help="The plain TRL recipe's precision: TRL's default (bf16 autocast), or fp32 (bf16=False), "
                             "what a user of a CPU without bf16 units (AVX2 only) turns to: bf16 crawls there.")
    parser.add_argument("--val-examples", type=int, default=DEFAULT_VAL_EXAMPLES,
                        help="Validation conversations scored after each run.")
    parser.add_argument("--convert-n", type=int, default=DEFAULT_CONVERT_N,
                        help="Conversations in the generated export for the converter benchmark.")
    parser.add_argument("--chat-tokens", type=int, default=64, help="New tokens per playground reply.")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="`decode`: most new tokens per reply (tuner's; llama.cpp writes as many as tuner did).")
    parser.add_argument("--decode-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="`decode`: serve tuner's side in this dtype instead of the product's choice "
                             "(tuner.precision.serving_dtype), to measure the alternative.")
    parser.add_argument("--decode-prompts", type=int, default=DECODE_PROMPTS,
                        help="`decode`: held-out prompts answered by each side.")
    parser.add_argument("--quick-steps", type=int, default=None,
                        help="Override the quick preset's max_steps (for smoke tests; default: the preset's).")
    parser.add_argument("--estimate-presets", type=lambda v: [p.strip() for p in v.split(",")], default=None,
                        help="`estimate`: the presets pressed one after another (default: standard,standard,quick).")
    parser.add_argument("--estimate-steps", type=int, default=None,
                        help="`estimate`: override each run's max_steps (for smoke tests; default: the presets').")
    parser.add_argument("--quick-voice-prompts", type=int, default=None,
                        help="Held-out questions of the quick run's voice check (default: the preset's; smoke tests).")
    parser.add_argument("--estimate-voice-prompts", type=int, default=None,
                        help="Held-out questions of each estimate run's voice check (default: the preset's; smoke tests).")
    parser.add_argument("--profile-variant", metavar="NAME",
                        help="Profile this --variant instead of the default recipe.")
    parser.add_argument("--profile-steps", type=int, default=3, help="Train steps under the profiler.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="Where to write the results JSON.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of tables.")
    parser.add_argument("--quiet", action="store_true", help="No progress lines on stderr.")
    parser.add_argument("--keep", action="store_true", help="Keep the working folder (runs, logs, data).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measured run in this process


def cli(args: argparse.Namespace) -> int:
    if args.worker:
        return run_worker(args.worker)
    if args.repeats < 1 or args.tokens < 1 or args.val_examples < 1 or args.convert_n < 1:
        raise TunerError("--repeats, --tokens, --val-examples and --convert-n must be at least 1.")
    work = Path(tempfile.mkdtemp(prefix="tuner-bench-"))
    ok = False
    try:
        results = run_bench(args, work)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"working folder kept: {work}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(markdown(results))
        print(f"\nwritten: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for bench/run_bench.py: the same as `python -m tuner bench ...`."""
    from tuner.cli import main as tuner_main

    argv = sys.argv[1:] if argv is None else argv
    return tuner_main(["bench", *argv])
