"""The model families users bring (Llama 3.1/3.2, Qwen 2.5, Gemma 3, Phi 3.5, Mistral v0.3), end to end.

Each is a tiny random model built here from its transformers config with the family's real chat
template and special tokens (tests/families.py): the loss mask token by token, a 2-step QLoRA run
through the CLI, a playground reply, the merged export, the GGUF export and the Ollama TEMPLATE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, signoff_conversations
from families import BY_NAME, FAMILIES, REPLY_WORD, build_family, sentencepiece_ids

from tuner.errors import ModelError, TunerError
from tuner.messages import write_jsonl

NAMES = [f.name for f in FAMILIES]
SYSTEM = "You are the Lumen Lamps support crew."
CHAT = [{"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi, my lamp flickers."},
        {"role": "assistant", "content": "Sorry to hear that!\nWhich model is it?"},
        {"role": "user", "content": "The Halo."},
        {"role": "assistant", "content": "Noted.", "weight": 0},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Unplug it for ten seconds, then try again."}]
# what tuner's GGUF export does with each tiny family here (llama.cpp 0.3.36's converter): "checked" = converted
# and the llama.cpp check passed; "refused" = the converter does not know the synthetic tokenizer (Qwen2's
# pre-tokenizer over SmolLM2's vocabulary has no known hash; Phi 3's converter wants a sentencepiece
# tokenizer.model unless the tokenizer class is GPT2Tokenizer); "prompt differs" = converted, same replies,
# but llama.cpp tokenizes the prompt differently (it puts a space after each special token such as [INST]),
# which the check reports as failed
GGUF_RESULT = {"llama3.1": "checked", "llama3.2": "checked", "qwen2.5": "refused", "gemma3": "checked",
               "phi3.5": "refused", "mistral-v0.3": "prompt differs"}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f.name: build_family(f, root / f.name) for f in FAMILIES}


@pytest.fixture(scope="session")
def family_runs(family_models, tmp_path_factory) -> dict[str, dict]:
    """A 2-step QLoRA run of each family through `python -m tuner train --base-model DIR`;
    each family's final status as the CLI printed it (--json)."""
    root = tmp_path_factory.mktemp("family-runs")
    data = root / "data"
    data.mkdir()
    rows = signoff_conversations(10)
    for row in rows[::2]:
        row["messages"].insert(0, {"role": "system", "content": SYSTEM})
    write_jsonl(data / "train.jsonl", rows[:8])
    write_jsonl(data / "validation.jsonl", rows[8:])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[str, dict] = {}
    for name, model in family_models.items():  # one at a time: tuner trains one run per machine
        cmd = [sys.executable, "-m", "tuner", "train", "--base-model", str(model), "--data", str(data),
               "--preset", "quick", "--max-steps", "2", "--quantization", "nf4", "--batch-size", "2",
               "--max-length", "128", "--voice-prompts", "0", "--out", str(root / name), "--json"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        results[name] = {**(json.loads(lines[-1]) if lines else {}), "rc": proc.returncode,
                         "stderr": proc.stderr[-2000:], "log_lines": proc.stderr.splitlines(), "run": root / name}
    return results


def expected_reply(tok) -> str:
    """The wired model's greedy reply: the first token of REPLY_WORD (tests/families.py)."""
    return tok.decode(tok(REPLY_WORD, add_special_tokens=False)["input_ids"][:1]).strip()


# -- the loss mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_mask_trains_exactly_each_reply_and_its_end_of_turn_token(name, family_models):
    from transformers import AutoTokenizer

    from tuner.templates import assistant_mask, end_of_turn_token

    family = BY_NAME[name]
    tok = AutoTokenizer.from_pretrained(family_models[name])
    ids, mask = assistant_mask(tok, CHAT)
    # the tokens are the template's own rendering, as chat and the trainer see it
    assert ids == list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    text = tok.apply_chat_template(CHAT, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # token by token: the trained runs of tokens are the replies with weight, each closed by the end-of-turn token
    runs, current = [], []
    for (a, b), m in zip(offsets, mask, strict=True):
        if m:
            current.append(text[a:b])
        elif current:
            runs.append("".join(current))
            current = []
    if current:
        runs.append("".join(current))
    replies = [m["content"] for m in CHAT if m["role"] == "assistant" and m.get("weight", 1) != 0]
    assert [r.strip() for r in runs] == [r + family.end_of_turn for r in replies], runs
    # what follows each end-of-turn token (the newline, the next header) is not trained
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    ends = [i for i, (t, m) in enumerate(zip(ids, mask, strict=True)) if t == eot and m]
    assert len(ends) == len(replies) and all(i + 1 == len(ids) or not mask[i + 1] for i in ends)
    # no header, prompt or weight-0 reply token is trained
    assert end_of_turn_token(tok) == family.end_of_turn  # what generation stops at, read from the template
    untrained = "".join(text[a:b] for (a, b), m in zip(offsets, mask, strict=True) if not m)
    assert "Noted." in untrained and "lamp flickers" in untrained and SYSTEM not in "".join(runs)
    if family.sentencepiece:  # the tokenizer is the sentencepiece model's own encoding
        plain = "Unplug it for ten seconds, then try again."
        assert tok(plain, add_special_tokens=False)["input_ids"] == sentencepiece_ids(family_models[name], plain)


def test_a_template_that_rewrites_replies_is_refused_in_words(family_models):
    from transformers import AutoTokenizer

    from tuner.templates import assistant_mask

    tok = AutoTokenizer.from_pretrained(family_models["qwen2.5"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
                         "{% endfor %}")
    with pytest.raises(ModelError, match=r"qwen2\.5.*does not write assistant reply 1 verbatim.*Fix: "):
        assistant_mask(tok, CHAT[1:3])
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ModelError, match="not with an end-of-turn token.*assistant_only_loss: false"):
        assistant_mask(tok, CHAT[1:3])


# -- training, chat and export -----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_two_step_qlora_run_completes_through_the_cli(name, family_runs):
    result = family_runs[name]
    assert result["rc"] == 0 and result["status"] == "completed", result
    status = json.loads((result["run"] / "status.json").read_text())
    assert status["quantization"] == "nf4" and status["step"] == 2
    assert status["data"]["train"]["trained_tokens"] > 0
    assert (result["run"] / "adapter" / "adapter_model.safetensors").is_file()
    # no line about Hub kernels tuner never fetches (bitsandbytes' import warning on CPUs with AVX512-BF16)
    assert not [line for line in result["log_lines"] if "kernels-community" in line or "trust_remote_code" in line]


@pytest.mark.parametrize("name", NAMES)
def test_the_playground_reply_stops_at_the_end_of_turn_token(name, family_runs):
    from tuner.config import GenerationConfig
    from tuner.playground import Playground

    pg = Playground(device="cpu")
    pg.load_run(family_runs[name]["run"])
    reply = pg.reply(None, "Hi, is the Nova waterproof?", settings=GenerationConfig(max_new_tokens=8))
    # the wired model says the word, then the end of turn, then (if not stopped) a run-on word
    assert reply == expected_reply(pg.tokenizer)
    assert pg.tokenizer.convert_tokens_to_ids(BY_NAME[name].end_of_turn) in pg._end_ids


@pytest.mark.parametrize("name", NAMES)
def test_the_merged_export_chats_with_the_family_template(name, family_runs, family_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.export import export

    out = export(family_runs[name]["run"], tmp_path / "merged", merge=True)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(family_models[name]).chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    batch = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    new = model.generate(**batch, max_new_tokens=4, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert tok.decode(new, skip_special_tokens=True).strip() == expected_reply(tok)
    assert new[-1].item() == tok.convert_tokens_to_ids(BY_NAME[name].end_of_turn)  # generation stopped at it


@pytest.mark.parametrize("name", NAMES)
def test_the_gguf_export_converts_or_says_why_not(name, family_runs, tmp_path):
    from tuner.gguf import export_gguf

    expected = GGUF_RESULT[name]
    if expected == "refused":
        with pytest.raises(TunerError, match="does not know this model's tokenizer.*--merge"):
            export_gguf(family_runs[name]["run"], tmp_path / "gguf", quant="f16")
        assert not (tmp_path / "gguf").exists()
        return
    result = export_gguf(family_runs[name]["run"], tmp_path / "gguf", quant="f16")
    check = result["check"]
    assert Path(result["gguf"]).is_file() and check["chat_template_in_gguf"]
    weights = check["weights"]
    assert weights["identical_replies"] == weights["prompts"]  # same weights: the same greedy replies
    same_prompt = [case["same_prompt_tokens"] for case in weights["cases"]]
    if expected == "checked":
        assert check["passed"] and all(same_prompt), check
    else:
        assert not check["passed"] and not any(same_prompt), check
        assert "FAILED" in Path(result["readme"]).read_text()


@pytest.mark.parametrize("name", NAMES)
def test_the_ollama_template_renders_the_jinja_text_of_a_three_turn_chat(name, family_models):
    from transformers import AutoTokenizer

    from tuner.gguf import modelfile_template, render_go_template

    tok = AutoTokenizer.from_pretrained(family_models[name])
    template, stops, note = modelfile_template(tok, SYSTEM)
    assert template is not None, note
    chat = [{k: v for k, v in m.items() if k != "weight"} for m in CHAT]
    for conv in (chat[:6], chat[1:6]):  # three user turns, with and without a system message
        assert render_go_template(template, conv) == tok.apply_chat_template(conv, tokenize=False,
                                                                              add_generation_prompt=True)
    assert BY_NAME[name].end_of_turn in stops
