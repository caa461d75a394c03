"""Export: the adapter alone, or merged into a model plain transformers loads; Hub push keeps the token out."""

from __future__ import annotations

import json
import logging
import secrets
import shutil

import pytest

from tuner.config import GenerationConfig
from tuner.errors import ModelError, TunerError
from tuner.playground import TUNED, Playground, read_run


def test_adapter_export_is_safetensors_with_a_card(signoff_run, tmp_path):
    from safetensors.torch import load_file

    from tuner.export import export
    from tuner.models import DEFAULT_HUB_ID

    out = export(signoff_run, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_HUB_ID
    card = (out / "README.md").read_text()
    assert f"base_model: {DEFAULT_HUB_ID}" in card and "library_name: peft" in card
    original = load_file(read_run(signoff_run).adapter_dir / "adapter_model.safetensors")
    exported = load_file(out / "adapter_model.safetensors")
    assert original.keys() == exported.keys()
    assert all((original[k] == exported[k]).all() for k in original)
    with pytest.raises(TunerError, match="not an empty folder"):
        export(signoff_run, tmp_path)  # a folder with other files in it is never overwritten
    assert export(signoff_run, out) == out  # an earlier export may be replaced


def test_merged_export_loads_with_plain_transformers_and_answers_like_the_adapter(signoff_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.export import _merge_dtype, export
    from tuner.models import default_checkpoint

    out = export(signoff_run, tmp_path / "merged", merge=True, dtype="float32")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.eval()

    settings = GenerationConfig(max_new_tokens=32)
    prompt = "Hello, my parcel never arrived."
    batch = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    ids = model.generate(**batch, max_new_tokens=settings.max_new_tokens, do_sample=False,
                         repetition_penalty=settings.repetition_penalty)
    merged_reply = tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    pg = Playground()
    pg.load_run(signoff_run)
    assert merged_reply == pg.reply([], prompt, TUNED, settings)
    # by default the merged weights are 16-bit (the embedded base is stored in fp32)
    assert _merge_dtype("auto", str(default_checkpoint())) == torch.bfloat16


def test_failed_push_names_the_problem_and_never_writes_the_token(signoff_run, tmp_path, caplog, capsys):
    from tuner.export import export

    token = "hf_" + secrets.token_hex(16)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunerError) as info:  # the test session is offline (HF_HUB_OFFLINE=1)
        export(signoff_run, tmp_path / "pushed", push_to="someone/lamp-voice", token=token)
    message = str(info.value)
    assert "offline" in message.lower() and token not in message
    assert (tmp_path / "pushed" / "adapter_model.safetensors").is_file()  # the export itself is kept
    for folder in (tmp_path / "pushed", signoff_run):
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert token not in caplog.text and token not in captured.out + captured.err
    with pytest.raises(TunerError, match="token"):
        export(signoff_run, tmp_path / "no-token", push_to="someone/lamp-voice", token=None)
    with pytest.raises(TunerError, match="repository id"):
        export(signoff_run, tmp_path / "bad-id", push_to="../../etc", token=token)


def test_export_refuses_pickle_weights(signoff_run, tmp_path):
    from tuner.export import export

    run = tmp_path / "run"
    shutil.copytree(signoff_run, run)
    (read_run(run).adapter_dir / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="safetensors"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_takes_the_token_from_the_environment(signoff_run, tmp_path, monkeypatch, capsys):
    from tuner.cli import main

    token = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", token)
    code = main(["export", "--run", str(signoff_run), "--to", str(tmp_path / "cli"), "--push", "someone/lamp-voice"])
    captured = capsys.readouterr()
    assert code == 2 and "offline" in captured.err.lower()
    assert token not in captured.out + captured.err
    assert main(["export", "--run", str(signoff_run), "--to", str(tmp_path / "cli2")]) == 0
    assert (tmp_path / "cli2" / "adapter_model.safetensors").is_file()
