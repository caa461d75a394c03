"""GGUF export: the tuned run runs in llama.cpp and answers like the merged model; the Modelfile's
template renders the same prompt as the tokenizer's own chat template."""

from __future__ import annotations

import json

import pytest

from tuner.errors import TunerError
from tuner.gguf import modelfile_template, render_go_template, shipped_settings, write_modelfile

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


def _modelfile_settings(text: str) -> dict:
    """A Modelfile's PARAMETER lines and SYSTEM, as Ollama reads them."""
    params: dict = {"stops": []}
    for line in text.splitlines():
        if line.startswith("PARAMETER stop "):
            params["stops"].append(json.loads(line.split(" ", 2)[2]))
        elif line.startswith("PARAMETER "):
            _, key, value = line.split(" ", 2)
            params[key] = float(value) if "." in value else int(value)
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    return {**params, "system": system}


def test_modelfile_has_template_stops_system_and_the_playground_defaults(tokenizer, tmp_path):
    from tuner.config import GenerationConfig

    ship = shipped_settings(tokenizer, "You are the Lumen Lamps crew.")
    text = write_modelfile(tmp_path, "run-q8_0.gguf", ship).read_text()
    assert "FROM ./run-q8_0.gguf" in text
    assert f'TEMPLATE """{ship.template}"""' in text
    assert 'SYSTEM """You are the Lumen Lamps crew."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    settings = GenerationConfig()
    written = _modelfile_settings(text)
    assert written["temperature"] == settings.temperature and written["repeat_penalty"] == settings.repetition_penalty
    assert written["num_predict"] == settings.max_new_tokens
    assert written["repeat_last_n"] == ship.repeat_last_n and written["num_ctx"] == ship.num_ctx  # not left to defaults
    with pytest.raises(TunerError, match="triple quotes"):
        write_modelfile(tmp_path, "run-q8_0.gguf", shipped_settings(tokenizer, 'Say """hi"""'))


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


def _same_as_modelfile(check: dict, folder) -> None:
    """The check ran exactly what the Modelfile ships."""
    written = _modelfile_settings((folder / "Modelfile").read_text())
    ran = check["settings"]
    for key in ("temperature", "top_p", "repeat_penalty", "repeat_last_n", "seed", "num_predict", "num_ctx", "system"):
        assert written[key] == ran[key], key
    assert written["stops"] == list(ran["stops"])


@pytest.mark.slow
def test_f16_gguf_answers_token_for_token_like_the_merged_model(signoff_run, tokenizer, tmp_path):
    from pathlib import Path

    from tuner.gguf import export_gguf

    steps: list[float] = []
    result = export_gguf(signoff_run, tmp_path / "f16", quant="f16", progress=lambda f, m: steps.append(f))
    check = result["check"]
    assert check["passed"], json.dumps(check, indent=2)
    weights = check["weights"]
    # the product's rule for f16: the same greedy replies. Teacher-forced next tokens may flip at a near-tie, since
    # f16 rounds the weights and llama.cpp's kernels differ by CPU (Intel AMX, AVX512 EPYC: 1.0; AVX2-only EPYC: 0.981)
    assert weights["identical_replies"] == weights["prompts"] == 3 and weights["next_token_agreement"] >= 0.97
    assert all(c["same_prompt_tokens"] for c in weights["cases"])  # the GGUF's tokenizer reads the prompt the same
    # graded like the voice verdict, on every held-out prompt of the run (8 validation conversations)
    voice, n = check["voice"], len(check["cases"])
    assert n == 8 and min(voice["merged"]["exact"], voice["gguf"]["exact"]) >= n - voice["slack"], \
        json.dumps(check, indent=2)  # the sign-off was learned, and the file keeps it as the Modelfile runs it
    assert f"the f16 file ends like your agents on {voice['gguf']['exact']} of {n} new questions" in check["sentence"]
    assert check["failures"] == [] and check["sentence"].endswith("Passed.")
    assert steps == sorted(steps) and steps[-1] == 1.0
    folder = Path(result["folder"])
    assert {p.name for p in folder.iterdir()} >= {Path(result["gguf"]).name, "Modelfile", "README.md", "check.json"}
    _same_as_modelfile(check, folder)
    readme = (folder / "README.md").read_text()
    assert "ollama create" in readme and check["sentence"] in readme
    assert "Personal data not checked" in readme  # the run's data never went through the converter
    fields = _gguf_fields(result["gguf"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["general.name"] == signoff_run.name and "tuner" in fields["general.description"]
    assert fields["general.sampling.penalty_repeat"] == pytest.approx(check["settings"]["repeat_penalty"])


@pytest.mark.slow
def test_q8_0_gguf_from_the_cli_keeps_the_brand_markers_and_the_lora_runs_on_the_base(signoff_run, tmp_path,
                                                                                       capsys):
    from pathlib import Path

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
    voice = check["voice"]
    assert voice["gguf"]["exact"] >= voice["merged"]["exact"] - voice["slack"], json.dumps(check, indent=2)
    assert check["weights"]["next_token_agreement"] >= 0.9, json.dumps(check, indent=2)
    assert any(SIGN_OFF in c["gguf"] for c in check["cases"])
    _same_as_modelfile(check, Path(result["folder"]))
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


@pytest.mark.slow
def test_a_file_without_the_runs_voice_fails_the_check_and_shows_the_reply(signoff_run, tmp_path):
    """The base model's own GGUF (no adapter in it) checked against the tuned run: it never signs off like the
    agents, so the check fails, and the message quotes a held-out prompt, the file's reply and the merged model's."""
    from transformers import AutoTokenizer

    from tuner.export import export
    from tuner.gguf import check_gguf, check_prompts
    from tuner.models import embedded_gguf
    from tuner.runs import Run
    from tuner.train.voicecheck import habit_of
    from tuner.voice import training_replies

    merged = export(signoff_run, tmp_path / "merged", merge=True, dtype="float16")
    ship = shipped_settings(AutoTokenizer.from_pretrained(merged), None)
    marker = habit_of(training_replies(Run(signoff_run).data_file("train.jsonl"))[0])
    assert marker is not None and marker.kind == "sign-off"
    prompts = check_prompts(signoff_run)
    check = check_gguf(embedded_gguf(), merged, "q4_1", ship, prompts, marker)
    assert not check["passed"] and check["voice"]["gguf"]["exact"] < check["voice"]["merged"]["exact"]
    failure = check["failures"][0]
    assert failure["prompt"] in prompts and marker.text in failure["merged"] and marker.text not in failure["gguf"]
    sentence = check["sentence"]
    assert "FAILED" in sentence and f'On "{failure["prompt"]}"' in sentence
    assert " ".join(failure["gguf"].split())[:100] in sentence  # the reply that failed, as the file gave it
    assert marker.text in sentence.split("the merged model replied", 1)[1]  # and the merged model's beside it
    assert f"the q4_1 file ends like your agents on {check['voice']['gguf']['exact']} of {len(prompts)}" in sentence
