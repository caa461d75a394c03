"""GGUF export: the tuned run runs in llama.cpp and answers like the merged model; the Modelfile's
template renders the same prompt as the tokenizer's own chat template."""

from __future__ import annotations

import json

import pytest

from tuner.errors import TunerError
from tuner.gguf import modelfile_template, render_go_template, write_modelfile

CONVERSATION = [
    {"role": "system", "content": "You are the Lumen Lamps support crew. Be brief."},
    {"role": "user", "content": "Hi, my Halo lamp flickers."},
    {"role": "assistant", "content": "Sorry about that!\nUnplug it for ten seconds, then try again."},
    {"role": "user", "content": "Still flickering. Can I return it?"},
]


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]],
                         ids=["system-multi-turn", "no-system-multi-turn", "one-turn"])
def test_modelfile_template_renders_the_tokenizers_chat_template(tokenizer, messages):
    template, stops, _ = modelfile_template(tokenizer, CONVERSATION[0]["content"])
    assert template is not None
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_go_template(template, messages) == expected
    assert "<|im_end|>" in stops  # SmolLM2 is ChatML: a reply ends with <|im_end|>


def test_modelfile_has_template_stops_system_and_the_playground_defaults(tokenizer, tmp_path):
    from tuner.config import GenerationConfig

    facts = write_modelfile(tmp_path, "run-q8_0.gguf", tokenizer, "You are the Lumen Lamps crew.")
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./run-q8_0.gguf" in text
    assert f'TEMPLATE """{facts["template"]}"""' in text
    assert 'SYSTEM """You are the Lumen Lamps crew."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    settings = GenerationConfig()
    assert f"PARAMETER temperature {settings.temperature}" in text
    assert f"PARAMETER repeat_penalty {settings.repetition_penalty}" in text
    with pytest.raises(TunerError, match="triple quotes"):
        write_modelfile(tmp_path, "run-q8_0.gguf", tokenizer, 'Say """hi"""')


@pytest.mark.parametrize("template, messages, expected", [
    ("{{- range .Messages }}\n  {{ .Role }}: {{ .Content }}\n{{- end }}",
     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "\n  user: a\n  assistant: b"),
    ('{{ if .System }}S={{ .System }};{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}U{{ else }}O{{ end }}'
     "{{ end }}", [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "S=x;OU"),
    ("{{ if not .System }}default{{ else }}own{{ end }}", [{"role": "user", "content": "y"}], "default"),
])
def test_go_template_subset(template, messages, expected):
    assert render_go_template(template, messages) == expected


def test_go_template_outside_the_subset_is_refused():
    with pytest.raises(ValueError):
        render_go_template("{{ range .Tools }}{{ end }}", [])
    with pytest.raises(ValueError):
        render_go_template("{{ if .System }}never closed", [])


@pytest.mark.slow
def test_unsupported_architecture_is_refused_by_name(default_model_path, tmp_path):
    import shutil

    from tuner.gguf import convert_model

    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(default_model_path / name, model / name)
    config = json.loads((default_model_path / "config.json").read_text())
    config["architectures"] = ["TotallyNewForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunerError, match="TotallyNewForCausalLM"):
        convert_model(model, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_gguf_export_is_available_after_make_setup():
    from tuner.gguf import unavailable_reason

    assert unavailable_reason() is None  # `make setup` installs llama-cpp-python


def _gguf_fields(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.slow
def test_f16_gguf_answers_token_for_token_like_the_merged_model(signoff_run, tokenizer, tmp_path):
    from pathlib import Path

    from tuner.gguf import export_gguf

    steps: list[float] = []
    result = export_gguf(signoff_run, tmp_path / "f16", quant="f16", progress=lambda f, m: steps.append(f))
    check = result["check"]
    assert check["passed"], json.dumps(check, indent=2)
    assert check["identical_replies"] == check["prompts"] == 3 and check["next_token_agreement"] == 1.0
    assert all(c["same_prompt_tokens"] for c in check["cases"])  # the GGUF's tokenizer reads the prompt the same
    assert any(c["markers_transformers"] for c in check["cases"])  # the sign-off was learned: markers can differ
    assert steps == sorted(steps) and steps[-1] == 1.0
    folder = Path(result["folder"])
    assert {p.name for p in folder.iterdir()} >= {Path(result["gguf"]).name, "Modelfile", "README.md", "check.json"}
    assert "ollama create" in (folder / "README.md").read_text()
    fields = _gguf_fields(result["gguf"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["general.name"] == signoff_run.name and "tuner" in fields["general.description"]


@pytest.mark.slow
def test_q8_0_gguf_from_the_cli_keeps_the_brand_markers_and_the_lora_runs_on_the_base(signoff_run, tmp_path,
                                                                                       capsys):
    import llama_cpp
    from conftest import SIGN_OFF

    from tuner.cli import main
    from tuner.models import embedded_gguf

    out = tmp_path / "q8"
    code = main(["export", "--run", str(signoff_run), "--to", str(out), "--format", "gguf", "--quant", "q8_0",
                 "--lora-gguf", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result["check"]
    check = result["check"]
    # q8_0 rounds each weight to 8 bits: a near-tie may flip a reply's wording, the brand voice stays
    assert check["same_brand_markers"] and check["next_token_agreement"] >= 0.9, json.dumps(check, indent=2)
    assert any(SIGN_OFF.split(",")[0] in c["llama_cpp"] for c in check["cases"])
    f16_size = 269  # MB: the f16 file of the 135M default model (the f16 test's figure)
    assert result["sizes_mb"][f"{signoff_run.name}-q8_0.gguf"] < 0.6 * f16_size
    assert _gguf_fields(result["adapter_gguf"])["general.type"] == "adapter"

    base = embedded_gguf()  # the Q4_1 GGUF the run was trained on (dequantized): the adapter's own base
    assert base is not None
    llm = llama_cpp.Llama(model_path=str(base), lora_path=result["adapter_gguf"], n_ctx=512, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": "Hi, where is my order (case 3)?"}],
                                           temperature=0.0, max_tokens=48)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert SIGN_OFF.split(",")[0] in reply
