"""tuner.train: run folders, assistant-only labels, real QLoRA / LoRA training on the embedded model."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
from conftest import SIGN_OFF, signoff_conversations, train_watched

from tuner import runs, train
from tuner.config import TrainConfig
from tuner.errors import DataError, TrainingError, TunerError
from tuner.playground import read_run

# small and quick: a sign-off is learned in a few large steps on short examples
SMALL = {"max_steps": 6, "batch_size": 4, "learning_rate": 2e-3, "max_length": 128, "eval_steps": 3,
         "save_steps": 3, "warmup_ratio": 0.0, "early_stopping_patience": 0,
         "eval_share": 1.0, "save_every_s": 0}  # every eval_steps / save_steps: the steps asserted below


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# -- config and run folder -------------------------------------------------------------------------


def test_config_round_trips_and_prepare_run_records_the_data(signoff_data, tmp_path):
    cfg = TrainConfig.from_preset("quick", quantization="none", learning_rate=3e-4, target_modules="q_proj,v_proj")
    for name in ("config.yaml", "config.json"):
        cfg.save(tmp_path / name)
        assert TrainConfig.load(tmp_path / name) == cfg

    run = runs.prepare_run(cfg, signoff_data, run_dir=tmp_path / "run")
    assert TrainConfig.load(run / "config.yaml") == cfg  # the run is re-created from this file alone
    sources = json.loads((run / "data" / "sources.json").read_text())
    for name in ("train.jsonl", "validation.jsonl"):
        copy = run / "data" / name
        assert copy.read_bytes() == (signoff_data / name).read_bytes()
        assert sources[name]["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert sources["train.jsonl"]["examples"] == 40 and sources["validation.jsonl"]["examples"] == 8
    status = runs.read_status(run)
    assert status["status"] == "queued" and status["step"] == 0 and status["adapter"] is None

    with pytest.raises(TrainingError, match="already holds a run"):
        runs.prepare_run(cfg, signoff_data, run_dir=run)


def test_bad_data_is_refused_with_file_line_and_fix(tmp_path):
    rows = signoff_conversations(3)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with open(tmp_path / "data" / "train.jsonl", "a") as fh:
        fh.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}\n')
        fh.write("{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 4: message 1 needs a role"):
        runs.prepare_run(TrainConfig(), tmp_path / "data", run_dir=tmp_path / "run")
    with pytest.raises(DataError, match="no train.jsonl here. Fix"):
        runs.prepare_run(TrainConfig(), tmp_path / "nowhere")
    with pytest.raises(TunerError, match="multiple of eval_steps"):
        TrainConfig(eval_steps=10, save_steps=15)


# -- labels ---------------------------------------------------------------------------------------


def test_exactly_the_assistant_replies_carry_labels_and_empty_examples_are_dropped(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "system", "content": "You are Lumen's helper."},
                      {"role": "user", "content": "Hi, my lamp flickers."},
                      {"role": "assistant", "content": "Unplug it for ten seconds."},
                      {"role": "user", "content": "Done, thanks!"},
                      {"role": "assistant", "content": f"Glad it works. {SIGN_OFF}"}]},
        {"messages": [{"role": "user", "content": "Where is my order?"},
                      {"role": "assistant", "content": "An old reply we do not want to learn.", "weight": 0},
                      {"role": "user", "content": "Hello?"},
                      {"role": "assistant", "content": f"It left today. {SIGN_OFF}"}]},
        # nothing to learn: no assistant reply at all, and a reply that lies beyond max_length
        {"messages": [{"role": "user", "content": "Is anyone there?"}]},
        {"messages": [{"role": "user", "content": "lamp " * 200}, {"role": "assistant", "content": "Sure."}]},
    ] + signoff_conversations(4)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", signoff_conversations(2, seed=5))
    cfg = TrainConfig.from_preset("quick", **{**SMALL, "quantization": "none"})
    run = runs.prepare_run(cfg, tmp_path / "data", run_dir=tmp_path / "run")

    trainer, ctx = train.build_trainer(run, cfg, "cpu")
    status = runs.read_status(run)
    assert [(d["file"], d["line"]) for d in status["dropped"]] == [("train.jsonl", 3), ("train.jsonl", 4)]
    assert "beyond max_length=128" in status["dropped"][1]["reason"]
    assert status["data"]["train"]["examples"] == len(rows) - 2

    kept = [r for i, r in enumerate(rows) if i not in (2, 3)]
    dataset = trainer.train_dataset
    assert len(dataset) == len(kept)
    for example, row in zip(dataset, kept, strict=True):
        trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        assert trained, "an example with no trained token"
        assert all(label in (-100, t) for t, label in zip(example["input_ids"], example["labels"], strict=True))
        expected = "".join(m["content"] + "<|im_end|>" for m in row["messages"]
                           if m["role"] == "assistant" and m.get("weight", 1) != 0)
        assert tokenizer.decode(trained) == expected
        # the rendered text is the model's own chat format (the training template only adds markers)
        assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
            [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]], tokenize=False)

    # a collated batch pads with labels that carry no loss
    by_length = sorted(dataset, key=lambda e: len(e["input_ids"]))
    batch = trainer.data_collator([by_length[-1], by_length[0]])
    short = len(by_length[0]["input_ids"])
    assert short < batch["input_ids"].shape[1] and (batch["labels"][1, short:] == -100).all()


# -- training: the shared sign-off run (quantization none) ---------------------------------------------


def test_lora_run_completes_learns_and_writes_a_reloadable_adapter(signoff_run, default_model_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from tuner.models import load_model, load_tokenizer

    status = runs.read_status(signoff_run)
    assert status["status"] == "completed", status.get("error")
    assert status["eval_loss"] < status["first_eval_loss"]  # it learned the validation replies
    assert status["step"] == status["max_steps"] and status["tokens_trained"] > 0 and status["peak_memory_mb"] > 0

    metrics = runs.read_metrics(signoff_run)
    steps = [r["step"] for r in metrics if r["loss"] is not None]
    assert steps == list(range(1, status["max_steps"] + 1))
    assert metrics[0]["step"] == 0 and metrics[0]["eval_loss"] == status["first_eval_loss"]  # before training
    for record in metrics:
        assert isinstance(record["step"], int) and record["elapsed_s"] >= 0
        assert {"loss", "eval_loss", "learning_rate", "tokens_per_s", "elapsed_s", "eta_s"} <= record.keys()
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in metrics if r["loss"] is not None)

    adapter = Path(status["adapter"])
    assert adapter == signoff_run / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # nothing that unpickles
    assert not list(signoff_run.glob(".adapter*"))  # no temporary folder left behind
    card = (adapter / "README.md").read_text()
    for fact in ("SmolLM2-135M-Instruct", "40 conversations", f"{status['first_eval_loss']:.4f}",
                 f"{status['eval_loss']:.4f}", "learning_rate: 0.002", "sha256"):
        assert fact in card
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # only the adapter, never base weights
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero: it moved

    tok = load_tokenizer("default")
    assert "{% generation %}" not in (tok.chat_template or "")
    assert (adapter / "chat_template.jinja").read_text() == tok.chat_template  # ships the model's own template
    model = PeftModel.from_pretrained(load_model("default", dev="cpu"), str(adapter))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi, where is my order (case 99)?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False)
    reply = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Stay sunny" in reply, reply


# -- training: QLoRA (NF4 base), in this process so the weights can be compared ------------------------


def test_qlora_trains_the_adapter_and_leaves_the_4bit_base_untouched(signoff_data, tmp_path):
    import torch

    cfg = TrainConfig.from_preset("quick", **{**SMALL, "quantization": "nf4"})
    run = runs.prepare_run(cfg, signoff_data, run_dir=tmp_path / "run")
    trainer, ctx = train.build_trainer(run, cfg, "cpu")
    model = trainer.model
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())  # a real NF4 base
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    with (warnings.catch_warnings(record=True) as caught,
          train.training_context(model, ctx["precision"])):  # as train_run does, in the precision it chose here
        warnings.simplefilter("always")
        trainer.train()
    # the evaluation before training must not leave the 4-bit layers in bitsandbytes' inference-only CPU
    # layout, whose kernel has no backward (gradients through the base would be silently wrong)
    assert not [str(w.message) for w in caught if "autograd kernel was not registered" in str(w.message)]
    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in model.modules())

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed <= lora  # the base (4-bit weights, norms, embeddings) did not move
    assert len(changed) > 0.9 * len(lora)  # the adapter did
    metrics = runs.read_metrics(run)
    evals = [r["eval_loss"] for r in metrics if r["eval_loss"] is not None]
    assert len(evals) == 3 and evals[-1] < evals[0]  # before training, step 3, step 6
    assert [p.name for p in runs.complete_checkpoints(run)] == ["checkpoint-3", "checkpoint-6"]


KEEP_FREED = """
import torch
from tuner.train import training_context

def freed_mb():  # what freeing a step's worth of 16 MB blocks (activations, LM-head tiles) hands back to the system
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    blocks = [torch.ones(4 * 2**20) for _ in range(16)]  # touched: resident
    held = rss()
    del blocks
    return held - rss()

freed_mb()  # glibc's first frees move its own thresholds; the next step is the one that counts
print(round(freed_mb()), end=" ")
with training_context(torch.nn.Linear(2, 2), {"bf16": False, "fp16": False}):
    print(round(freed_mb()))
"""


def test_a_cpu_training_process_keeps_the_memory_a_step_frees_for_the_next(tmp_path):
    """A CPU step frees and allocates hundreds of 1-32 MB blocks; glibc by default gives them back to the system
    and faults them in again next time, which on the machines measured cost 15% of the steps (bench/README.md).
    In a fresh process: freeing 256 MB in 16 MB blocks inside the training context keeps them."""
    import platform
    import subprocess
    import sys

    from tuner.train.trainer import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False  # the product leaves other allocators alone
        return
    out = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, timeout=300, check=True)
    before, inside = (float(v) for v in out.stdout.split())
    # glibc's default gave most of the 256 MB back (to be faulted in again) unless something small happened to
    # sit above it on the heap, so only the training side is asserted
    assert inside < 16, f"freed {inside:.0f} MB to the system inside training (before it: {before:.0f} MB)"


@pytest.mark.gpu
def test_qlora_on_cuda_uses_bf16_and_completes(signoff_data, tmp_path):
    import torch

    cfg = TrainConfig.from_preset("quick", **{**SMALL, "quantization": "nf4"})
    run = runs.prepare_run(cfg, signoff_data, run_dir=tmp_path / "run")
    status = train.train_run(run)
    assert status["status"] == "completed", status.get("error")
    assert status["device"] == "cuda" and status["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert status["eval_loss"] < status["first_eval_loss"]
    assert 0 < status["peak_memory_mb"] < torch.cuda.get_device_properties(0).total_memory / 2**20


def test_length_grouping_pads_little_on_a_small_dataset_and_keeps_every_example():
    import random

    import torch

    rng = random.Random(0)
    lengths = [rng.randint(100, 750) for _ in range(23)]  # the benchmark's size: transformers groups nothing here
    torch.manual_seed(0)
    order = train.length_grouped_batches(lengths, 4)
    assert sorted(order) == list(range(23))  # every example once per epoch
    batches = [order[i:i + 4] for i in range(0, 23, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # an out-of-memory batch fails at step 1
    assert len(batches[-1]) == 3 and all(len(b) == 4 for b in batches[:-1])  # the short batch stays last

    def fill(bs):
        return sum(lengths[i] for b in bs for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in bs)

    shuffled = list(range(23))
    rng.shuffle(shuffled)
    assert fill(batches) > 0.85 > fill([shuffled[i:i + 4] for i in range(0, 23, 4)])
    torch.manual_seed(1)
    assert train.length_grouped_batches(lengths, 4) != order  # batch order changes with the seed (epoch)


def test_default_is_qlora_on_cpu_and_gpu_and_full_fine_tuning_keeps_full_weights():
    for dev in ("cpu", "cuda"):
        assert train.quantization(TrainConfig(), dev) == "nf4"  # the same QLoRA path on both
        assert train.quantization(TrainConfig(method="full"), dev) == "none"
        assert train.quantization(TrainConfig(quantization="none"), dev) == "none"
    with pytest.raises(TunerError, match="Full fine-tuning cannot train 4-bit weights"):
        TrainConfig(method="full", quantization="nf4")


def test_evaluations_and_checkpoints_are_budgeted_by_time_and_the_result_is_scored_on_every_example(
        signoff_data, tmp_path):
    # due every step by the step counts; the time budget decides which happen
    cfg = TrainConfig.from_preset("quick", **{**SMALL, "quantization": "none", "eval_steps": 1, "save_steps": 1,
                                              "eval_share": 0.1, "save_every_s": 3600, "eval_examples": 4})
    run = runs.prepare_run(cfg, signoff_data, run_dir=tmp_path / "run")
    status = train.train_run(run)
    assert status["status"] == "completed", status.get("error")
    assert status["phase"] == "done"
    metrics = runs.read_metrics(run)
    eval_steps = [r["step"] for r in metrics if r["eval_loss"] is not None]
    assert eval_steps[0] == 0 and eval_steps[-1] == 6  # before training, and the last step always
    assert len(eval_steps) < 7  # not every step: an evaluation costs more than a tenth of a step's time here
    # checkpoints: none by the clock (an hour apart), only new bests and the last step
    evals = {r["step"]: r["eval_loss"] for r in metrics if r["eval_loss"] is not None}
    for checkpoint in runs.complete_checkpoints(run):
        step = int(checkpoint.name.split("-")[1])
        assert step == 6 or evals[step] < min(v for k, v in evals.items() if k < step), (step, evals)
    # evaluated during training on a seeded sample of 4; the result once more on all 8
    assert status["eval_examples"] == 4 and status["data"]["validation"]["examples"] == 8
    assert status["eval_loss_all"] is not None and status["eval_loss_all"] != status["eval_loss"]
    assert status["examples_seen"] == 6 * cfg.batch_size
    card = (run / "adapter" / "README.md").read_text()
    assert "validation loss on all 8 validation examples" in card


def test_the_train_command_has_a_flag_for_every_setting_and_starts_from_the_pages_preset(tmp_path):
    import dataclasses

    from tuner.cli import build_parser
    from tuner.config import DEFAULT_PRESET, PRESETS
    from tuner.train.cli import config_from_args

    parser = build_parser("train")
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "preset":
            assert f"--{f.name.replace('_', '-')}" in help_text, f.name  # a new setting appears without a second edit

    from tuner.config import GenerationConfig

    for command in ("eval", "chat"):  # the same settings as the playground's, from one dataclass
        sub = build_parser(command)._subparsers._group_actions[0].choices[command].format_help()
        for f in dataclasses.fields(GenerationConfig):
            assert f"--{f.name.replace('_', '-')}" in sub, (command, f.name)

    def config(*argv: str) -> TrainConfig:
        return config_from_args(parser.parse_args(["train", "--data", str(tmp_path), *argv]))

    plain = config()
    assert plain.preset == DEFAULT_PRESET
    assert plain == TrainConfig.from_preset(DEFAULT_PRESET)  # the page's preset, untouched
    tuned = config("--preset", "balanced", "--lora-r", "8", "--no-packing", "--precision", "fp32", "--epochs", "3")
    assert (tuned.preset, tuned.lora_r, tuned.packing, tuned.precision) == ("balanced", 8, False, "fp32")
    assert tuned.num_epochs == 3.0 and tuned.max_steps == -1  # epochs asked for: no step limit
    # issue 25: `--epochs 1` on 94 conversations trained 2 epochs, the standard preset's 24-step floor winning
    one = config("--epochs", "1")
    assert one.preset == DEFAULT_PRESET and (one.min_steps, one.step_limit) == (0, 0)
    assert one.planned_steps(94) == 12 and one.step_plan(94)["by"] == "num_epochs"  # ceil(94 / 8): one epoch
    assert config().planned_steps(94) == 24  # without the flag, the preset's floor still holds
    assert config("--epochs", "1", "--min-steps", "20").planned_steps(94) == 20  # both given: both kept
    assert config("--max-steps", "5").planned_steps(5000) == 5  # max steps wins over the preset's floor too
    assert config("--preset", "quick", "--epochs", "1").planned_steps(94) == 12  # and over quick's max_steps
    assert config("--config", str(_saved(TrainConfig.from_preset(DEFAULT_PRESET), tmp_path)),
                  "--epochs", "1").planned_steps(94) == 12  # over a config file's bounds as well
    assert tuned.lora_alpha == PRESETS["balanced"]["lora_alpha"]  # the rest stays the preset's
    saved = tmp_path / "config.yaml"
    tuned.save(saved)
    again = config("--config", str(saved), "--learning-rate", "5e-4")
    assert again.learning_rate == 5e-4 and again.lora_r == 8 and again.preset == "balanced"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--precision", "fp64"])  # closed choices come from the field


def test_the_run_ends_with_a_voice_verdict_and_keeps_the_checkpoint_that_speaks_best(signoff_data, tmp_path):
    cfg = TrainConfig.from_preset("quick", **{**SMALL, "quantization": "none"})
    run = runs.prepare_run(cfg, signoff_data, run_dir=tmp_path / "run")
    seen: dict[str, bool] = {}  # what a user listing the run folder finds while the voice check runs

    def look() -> bool:
        now = runs.read_status(run)
        if "voice check" in (now.get("phase") or ""):
            seen["adapter on disk during the check"] = (run / "adapter" / "adapter_model.safetensors").is_file()
            seen["the page counts its time down"] = (now.get("eta_s") or 0) > 0  # from the reference or last run
            try:  # what the Playground tab asks before it loads a run
                seen["the playground takes it"] = read_run(run).adapter_dir == run / "adapter"
            except TunerError as exc:
                seen["the playground takes it"] = str(exc)
        return bool(seen)

    status = train_watched(run, look)
    assert status["status"] == "completed", status.get("error")
    # the result is saved (and checked) first, so it is usable while the verdict is worked out
    assert seen == {"adapter on disk during the check": True, "the page counts its time down": True,
                    "the playground takes it": True}
    assert 0 < status["saved_s"] < status["wall_s"] and status["saved_at"] > 0
    assert status["habit"] == SIGN_OFF and status["best_by"] == "voice"
    voice = status["voice"]
    # 8 validation prompts, none of them in the training data; the base never signs off like Lumen Lamps
    assert voice["tuned"]["prompts"] == 8 and voice["base"]["exact"] == 0
    assert voice["tuned"]["exact"] >= 6, voice
    assert voice["sentence"].startswith(f"ends like your agents on {voice['tuned']['exact']} of 8 new questions "
                                        "(base: 0)")
    assert "replies looped" in voice["sentence"] or "reply looped" in voice["sentence"]
    assert "general text perplexity" in voice["sentence"]
    assert "Voice check" in (run / "adapter" / "README.md").read_text()
    # the checkpoint kept is the best speaker among the evaluated ones (the loss only breaks ties)
    checks = {c["step"]: c["exact"] - c["looped"] - c["unended"] - c["empty"] for c in status["voice_checks"]}
    assert sorted(checks) == [3, 6]  # none at step 0: the base is no checkpoint to choose
    assert checks[status["best_step"]] == max(checks.values())


def test_a_reply_cut_off_at_the_token_limit_is_counted_as_degenerate(signoff_run, tokenizer):
    from peft import PeftModel

    from tuner.models import load_model
    from tuner.train.voicecheck import generate, habit_of, model_verdict
    from tuner.verdict import Marker

    model = PeftModel.from_pretrained(load_model("default", dev="cpu"), str(signoff_run / "adapter"))
    prompts = [[{"role": "user", "content": "Hi, the cable of my Halo lamp is frayed, what now?"}],
               [{"role": "user", "content": "Do you sell spare shades for the Nova?"}]]
    replies = [f"{answer} {SIGN_OFF}" for answer in ("Happy to help.", "It left today.", "Returns are free.",
                                                     "Unplug it first.")]
    assert habit_of(replies) == Marker("sign-off", SIGN_OFF)
    cut = model_verdict(model, tokenizer, tokenizer.chat_template, habit_of(replies), prompts, max_new_tokens=3)
    assert cut["tuned"]["unended"] == 2 and cut["base"]["unended"] == 2  # three tokens end no reply
    assert "2 never ended their turn" in cut["sentence"]
    # result and base answer in one mixed batch: the same replies as each asked alone
    full = model_verdict(model, tokenizer, tokenizer.chat_template, habit_of(replies), prompts, max_new_tokens=48)
    alone, _ = generate(model, tokenizer, tokenizer.chat_template, prompts, 48)
    with model.disable_adapter():
        base_alone, _ = generate(model, tokenizer, tokenizer.chat_template, prompts, 48)
    assert [e["tuned"] for e in full["examples"]] == alone
    assert [e["base"] for e in full["examples"]] == base_alone
    assert alone != base_alone  # the adapter was on for one and off for the other


def test_the_train_command_ends_saying_the_steps_and_epochs_it_really_trained(tmp_path):
    from tuner.train.cli import final_words

    done = {"status": "completed", "adapter": str(tmp_path / "adapter"), "first_eval_loss": 2.5, "eval_loss": 1.2,
            "step": 12, "max_steps": 12, "examples_seen": 96, "train_examples": 94, "epochs": 1.02, "total_s": 268.0}
    assert final_words(done, tmp_path).splitlines()[-1] == "eval loss 2.5 -> 1.2 in 12 steps (1.02 epochs of 94 " \
                                                           "examples), 4 min 28 s"


def _saved(cfg: TrainConfig, folder) -> str:
    path = folder / "saved-config.yaml"
    cfg.save(path)
    return str(path)


def test_the_default_preset_sizes_its_steps_to_the_data_within_its_bounds():
    from tuner.config import DEFAULT_PRESET

    cfg = TrainConfig.from_preset(DEFAULT_PRESET)
    per_step = cfg.batch_size * cfg.grad_accum
    # few conversations are repeated until ~200 examples are seen; many are cut at the step limit
    assert [cfg.planned_steps(n) for n in (50, 88, 250, 400, 5000)] == [24, 24, 32, 40, 40]
    assert cfg.planned_steps(250) == math.ceil(250 / per_step)  # in between: one pass
    assert TrainConfig.from_preset("quick").planned_steps(5000) == 12  # max_steps is exact
    assert TrainConfig(num_epochs=2.0, batch_size=4).planned_steps(10) == 5  # no bounds: plain epochs
    # the page and the CLI say why, with the same numbers
    assert cfg.steps_reason(94) == ("1 epoch of 94 examples is 12 steps, raised to the preset's minimum of 24 "
                                    "steps (min steps: 0 trains exactly the epochs)")
    assert cfg.steps_reason(5000).endswith("cut to the preset's limit of 40 steps (step limit: 0 trains every epoch)")
    assert cfg.step_plan(94)["epochs"] == pytest.approx(192 / 94)
    with pytest.raises(TunerError, match="min_steps"):
        TrainConfig(min_steps=50, step_limit=40)


def test_a_second_run_on_the_same_validation_set_takes_the_bases_first_evaluation_and_trains_the_same(tmp_path):
    """The evaluation before training scores the base, which does not change: the second run of the same base on
    the same validation sample takes it from the first and says so, and everything it then does is the same
    (the same batches in the same order: the same losses at every step)."""
    data = tmp_path / "data"  # validation chats no other test uses: the first run here is the first to score them
    rows = signoff_conversations(48, seed=11)
    write_jsonl(data / "train.jsonl", rows[:40])
    write_jsonl(data / "validation.jsonl", rows[40:])
    cfg = TrainConfig.from_preset("quick", **{**SMALL, "max_steps": 3, "voice_prompts": 0})
    first, second = (train.train_run(runs.prepare_run(cfg, data, run_dir=tmp_path / name)) for name in ("a", "b"))
    assert first["status"] == second["status"] == "completed"
    assert first["base_eval"]["source"] == "evaluated" and first["base_eval"]["seconds"] > 0
    assert second["base_eval"] == {"source": "cached", "seconds_saved": first["base_eval"]["seconds"]}

    def figures(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["eval_loss"]) for r in runs.read_metrics(tmp_path / run)]

    assert figures("a") == figures("b") and figures("a")[0] == (0, None, first["first_eval_loss"])
    assert second["first_eval_loss"] == first["first_eval_loss"] and second["eval_loss"] == first["eval_loss"]
