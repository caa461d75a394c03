"""`python -m tuner bench` runs end to end in a tiny mode and writes well-formed results.

No timing assertions: the figures come from the benchmark itself (bench/README.md). What is checked
is what a reader of bench/results.json relies on: both recipes trained on the same tokens, every
figure is there and positive, and the ratios are computed from the medians.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.speed import SAMPLE, TRAIN_METRICS, parse_variant, prepare_data
from tuner.errors import TunerError

ROOT = Path(__file__).resolve().parent.parent


def _bf16_is_slow() -> bool:
    """Whether the product's precision probe chose fp32 for training on this CPU (tuner.precision)."""
    import torch

    if torch.cuda.is_available():
        return False
    from tuner.precision import for_model

    return for_model("default")["choice"] == "fp32"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_path) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [sys.executable, "-m", "tuner", "bench", "--tokens", "300", "--repeats", "1", "--val-examples", "1",
           "--only", "train", "--only", "convert", "--convert-n", "300", "--only", "quick", "--quick-steps", "2", "--quick-voice-prompts", "2",
           "--only", "decode", "--decode-prompts", "2", "--decode-tokens", "8",
           "--only", "estimate", "--estimate-presets", "quick", "--estimate-steps", "1", "--estimate-voice-prompts", "2",
           "--out", str(out), "--quiet",
           # TRL's default bf16 autocast is emulated, 15x slower, on a CPU without bf16 units (AVX2 only): the
           # smoke test times the plain recipe in fp32 there, as the product's own probe would choose
           *(["--baseline-precision", "fp32"] if _bf16_is_slow() else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_results_describe_machine_and_command(tiny):
    results, _ = tiny
    assert results["command"].startswith("python -m tuner bench --tokens 300 --repeats 1")
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["versions"]["torch"]
    assert machine["device"] == "cpu" or machine["cuda"]
    assert len(results["load_average_start"]) == 3 and results["parts"] == ["train", "convert", "quick", "decode", "estimate"]


def test_train_runs_alternate_on_equal_tokens_with_positive_figures(tiny):
    results, _ = tiny
    train = results["train"]
    assert [r["recipe"] for r in train["runs"]] == ["baseline", "project"]
    baseline, project = train["runs"]
    # the same data, one pass each: both trainers count the same real (non-padding) tokens
    assert baseline["tokens"] == project["tokens"] == results["data"]["train_tokens"] > 0
    for run in train["runs"]:
        for key in ("tokens_per_s", "wall_s", "train_s", "peak_rss_mb", "achieved_tflops", "peak_matmul_tflops"):
            assert run[key] > 0, (run["recipe"], key, run[key])
        assert 0 < run["utilisation"] <= 1
        assert math.isfinite(run["eval_loss"]) and run["eval_loss"] > 0
        assert math.isfinite(run["eval_loss_all_tokens"]) and run["eval_loss_all_tokens"] > 0
        assert run["wall_s"] >= run["train_s"]
        assert Path(run["adapter"]).name == "adapter"
    assert baseline["gradient_checkpointing"] is True and baseline["batch_size"] == 8  # TRL's own defaults


def test_medians_and_ratios_come_from_the_runs(tiny):
    results, stdout = tiny
    train = results["train"]
    assert set(train["medians"]) == {"baseline", "project"}
    for metric in TRAIN_METRICS:
        a, p = train["medians"]["baseline"][metric], train["medians"]["project"][metric]
        if a is None or p is None:
            continue
        run_values = {r["recipe"]: r[metric] for r in train["runs"]}  # one repeat: the median is the value
        assert a == pytest.approx(run_values["baseline"], rel=1e-3)
        assert p == pytest.approx(run_values["project"], rel=1e-3)
        assert train["ratio"][metric] == pytest.approx(p / a, rel=1e-2)
    verdict = train["verdict"]
    # tuner saves the adapter, then asks it and the base the held-out questions: the verdict comes later,
    # and its ratio is set against the baseline's saved adapter (the plain recipe gives no verdict)
    project = train["medians"]["project"]
    assert 0 < project["whole_process_s"] < project["verdict_process_s"]
    assert train["ratio"]["verdict_process_s"] == pytest.approx(
        project["verdict_process_s"] / train["medians"]["baseline"]["whole_process_s"], rel=1e-2)
    assert verdict["to_verdict_speedup"] < verdict["whole_process_speedup"]
    assert "| command start to the voice verdict" in stdout
    assert verdict["tokens_per_s_ratio"] == train["ratio"]["tokens_per_s"]
    assert verdict["meets_3x"] == (verdict["tokens_per_s_ratio"] >= 3 and verdict["eval_loss_ok"])
    # the targets (adapter >= 2.5x, verdict >= 1.5x as fast as the plain recipe) are said against the baseline timed
    assert verdict["meets_adapter_target"] == (verdict["whole_process_speedup"] >= 2.5 and verdict["eval_loss_ok"])
    assert verdict["meets_verdict_target"] == (verdict["to_verdict_speedup"] >= 1.5 and verdict["eval_loss_ok"])
    timed = "baseline (TRL, fp32)" if train["baseline_precision"] == "fp32" else "baseline (TRL defaults)"
    assert f"Targets, against {timed}: command to adapter" in stdout and f"| metric | {timed} |" in stdout
    assert "| training tokens/s (real tokens) |" in stdout and "project / baseline" in stdout


def test_convert_figures(tiny):
    results, _ = tiny
    conv = results["convert"]
    assert conv["conversations"] == 300 and conv["ok"]
    assert conv["train_examples"] + conv["validation_examples"] + conv["dropped"] >= 1
    assert conv["conversations_per_s"] > 0 and conv["peak_rss_mb"] >= conv["peak_rss_before_mb"] > 0


def test_quick_figures_count_from_train_pressed_to_the_first_tuned_token(tiny):
    results, _ = tiny
    quick = results["quick"]
    assert quick["steps"] == 2 and quick["reply_tokens"] > 0 and quick["reply"].strip()
    # the parts add up: Train pressed -> adapter saved -> playground loaded -> first token, while the run's
    # voice check goes on beside, so the run completes after the adapter was saved
    assert 0 < quick["press_to_saved_s"] < quick["press_to_first_token_s"] <= quick["press_to_full_reply_s"]
    assert quick["press_to_first_token_s"] == pytest.approx(
        quick["press_to_saved_s"] + quick["playground_load_s"] + quick["first_token_s"], abs=0.05)
    assert quick["press_to_saved_s"] < quick["press_to_complete_s"]
    assert quick["estimated_s"] > 0 and quick["target_s"] == 60


def test_the_estimate_part_sets_the_train_tabs_estimate_against_the_real_time(tiny):
    results, stdout = tiny
    (first,) = results["estimate"]["runs"]  # one press keeps the smoke test short; learning is tests/test_jobs.py's
    # a new machine: the first estimate comes from reference speeds (or the precision probe on a CPU)
    assert (first["run"], first["learned"]) == ("first", False)
    from tuner.models import device

    cpu = device() == "cpu"
    assert first["source"] == ("probe" if cpu else "reference")
    assert f"| first | quick | 1 | {first['estimated_s']:.1f} | {'this CPU' if cpu else 'reference'}" in stdout
    assert first["steps"] == 1 and first["real_s"] > first["real_parts"]["startup_s"] > 0
    assert first["error"] == pytest.approx(first["estimated_s"] / first["real_s"] - 1, abs=1e-3)
    assert sum(first["estimated_parts"].values()) == pytest.approx(first["estimated_s"], abs=0.2)
    assert first["base_replies"] == "decoded"  # nothing cached in a new home
    # only learned estimates are judged against the 25% target: none was made in this run
    assert "Learned estimates within" not in stdout


@pytest.mark.parametrize("error, verdict", [(0.12, "within 12% of the real time (target 25%: met)"),
                                            (-0.4, "within 40% of the real time (target 25%: not met)")])
def test_the_estimate_table_judges_the_learned_rows_only(tiny, error, verdict):
    from bench.speed import markdown

    results, _ = tiny
    (first,) = results["estimate"]["runs"]
    again = {**first, "run": "again", "learned": True, "source": "run", "error": error, "base_replies": "cached"}
    text = markdown({**results, "estimate": {"runs": [{**first, "error": 0.9}, again]}})
    assert f"| again | quick | 1 | {first['estimated_s']:.1f} | the run before | {first['real_s']} | {100 * error:+.0f}% | cached |" in text
    assert f"Learned estimates {verdict}" in text  # the first row's 90% (reference speeds) is not the verdict


def test_benchmark_data_is_mixed_length_and_validation_is_held_out(tmp_path, default_model_path):
    data = prepare_data(tmp_path, tokens=6000, val_examples=4)
    assert 5700 <= data["train_tokens"] <= 6300
    assert data["example_tokens"]["max"] >= 3 * data["example_tokens"]["min"]
    assert data["assistant_turns"]["max"] >= 3  # multi-turn conversations, not only one exchange

    def pairs(conv: list[dict]) -> set[tuple[str, str]]:
        return {(conv[i]["content"], conv[i + 1]["content"]) for i in range(len(conv) - 1)
                if conv[i]["role"] == "user" and conv[i + 1]["role"] == "assistant"}

    def exchanges(name: str) -> set[tuple[str, str]]:
        lines = (Path(data["dir"]) / name).read_text(encoding="utf-8").splitlines()
        return set().union(*(pairs(json.loads(line)["messages"]) for line in lines))

    # every sixth sample conversation is held out; an exchange may still be in both sets only where the
    # sample itself repeats it in several conversations (stock follow-ups such as "Is it ok with oat milk?")
    sample = [json.loads(line)["messages"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    in_conversations = Counter(pair for conv in sample for pair in pairs(conv))
    held_out = exchanges("validation.jsonl")
    shared = held_out & exchanges("train.jsonl")
    assert held_out and len(shared) < len(held_out) / 4
    assert all(in_conversations[pair] > 1 for pair in shared)


@pytest.mark.parametrize("text, expected", [
    ("fp32:precision=fp32", ("fp32", {"precision": "fp32"})),
    ("plain:quantization=none,batch_size=8", ("plain", {"quantization": "none", "batch_size": 8})),
])
def test_parse_variant(text, expected):
    assert parse_variant(text) == expected


@pytest.mark.parametrize("text, message", [
    ("noname", "NAME:key=value"),
    ("project:batch_size=2", "NAME:key=value"),
    ("x:batchsize=2", "unknown TrainConfig setting 'batchsize'"),
    ("x:batch_size=0", "batch_size"),
])
def test_parse_variant_rejects_bad_input(text, message):
    with pytest.raises(TunerError, match=message):
        parse_variant(text)


def test_decode_sets_tuner_beside_llama_cpp_on_the_same_prompts_and_run(tiny):
    results, stdout = tiny
    d = results["decode"]
    assert 1 <= d["prompts"] <= 2 and d["dtype"] == "float32"  # the product's serving dtype on a CPU
    sides = ("tuner_playground_one_at_a_time", "tuner_voice_check_one_batch", "tuner_eval_base_and_tuned",
             "llama_cpp_f16_one_at_a_time")
    for side in sides:
        assert d[side]["seconds"] > 0 and d[side]["tokens"] > 0 and d[side]["tokens_per_s"] > 0, side
    # llama.cpp writes as many tokens as tuner's playground did, so the times compare the same replies
    assert d["llama_cpp_f16_one_at_a_time"]["tokens"] >= d["tuner_playground_one_at_a_time"]["tokens"]
    assert d["llama_cpp_f16_one_at_a_time"]["x_llama_cpp_time_per_token"] == 1.0
    assert d["batched_equals_one_at_a_time"] == d["prompts"]  # no padding dependence in the served dtype
    assert "| llama.cpp | llama.cpp, one prompt at a time |" in stdout
    project = results["train"]["runs"][1]
    # the voice check's seconds, and whether the base's replies were decoded or cached (None: nothing to check)
    assert project["voice_s"] > 0 and project["voice_base_replies"] in ("decoded", "cached", None)
