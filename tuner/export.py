"""Take a run's result elsewhere: the adapter alone, or merged into the base as a plain model.

- adapter: adapter_config.json + adapter_model.safetensors + the base tokenizer + a model card;
  load with `PeftModel.from_pretrained(base, folder)`.
- merged: the base reloaded without quantization, the adapter merged in (`merge_and_unload`),
  saved as safetensors in 16-bit (or the dtype asked for): a folder plain `transformers` loads.

With `push_to` and a token, the folder goes to a (private by default) Hub repository. The token
is passed to huggingface_hub for that call only: never written to disk, logs or the card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tuner.errors import ModelError, TunerError
from tuner.runs import Run, read_json_object

MARKER = "tuner_export.json"  # provenance of an export folder (also: "safe to overwrite")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DTYPES = ("auto", "bfloat16", "float16", "float32")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def _hub_id(base_model: str) -> str | None:
    """The Hub id a base model can be fetched by elsewhere (None for a local folder)."""
    from tuner.models import DEFAULT_HUB_ID, is_default

    if is_default(base_model):
        return DEFAULT_HUB_ID
    return base_model if REPO_ID_RE.match(base_model) and not Path(base_model).expanduser().exists() else None


def base_name(base_model: str) -> str:
    """The base model's short name for cards and file names: SmolLM2-135M-Instruct, org/name, or a folder's name."""
    from tuner.models import DEFAULT_MODEL_NAME, is_default

    return DEFAULT_MODEL_NAME if is_default(base_model) else (_hub_id(base_model) or Path(base_model).name)


def _merge_dtype(dtype: str, base_location: str):
    """The dtype to save a merged model in: 'auto' keeps a 16-bit base's dtype, else bfloat16."""
    import torch

    if dtype not in DTYPES:
        raise TunerError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.float16 if stored_dtype(base_location) == "float16" else torch.bfloat16


def stored_dtype(base_location: str) -> str | None:
    """The dtype a local checkpoint's config says its weights are stored in ('bfloat16', ...), if it says."""
    config = Path(base_location) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("dtype") or values.get("torch_dtype")


def prepare_target(to_dir: Path) -> None:
    """Refuse a target that holds anything but an earlier export (marked by MARKER); create its parent."""
    if to_dir.exists() and (not to_dir.is_dir() or (any(to_dir.iterdir()) and not (to_dir / MARKER).is_file())):
        raise TunerError(f"{to_dir} exists and is not an empty folder (nor an earlier export): pick a new folder.")
    to_dir.parent.mkdir(parents=True, exist_ok=True)


def _write_adapter(info, cfg, out: Path) -> None:
    from tuner.models import load_tokenizer

    shutil.copy2(info.adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    adapter_cfg = json.loads((info.adapter_dir / "adapter_config.json").read_text())
    # a local path means nothing on another machine (and reveals this one's layout): use the Hub id
    adapter_cfg["base_model_name_or_path"] = _hub_id(cfg.base_model) or base_name(cfg.base_model)
    (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    load_tokenizer(cfg.base_model).save_pretrained(out)


def _write_merged(info, cfg, out: Path, dtype: str) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuner.models import load_tokenizer, resolve_model

    location = resolve_model(cfg.base_model)
    target_dtype = _merge_dtype(dtype, location)
    # merge without quantization (a 4-bit base cannot hold the merged weights); a base stored in the target
    # 16-bit dtype merges in it (peft computes each delta in fp32 on CPU): an 8B model then needs its size in RAM
    same = stored_dtype(location) == str(target_dtype).removeprefix("torch.")
    base = AutoModelForCausalLM.from_pretrained(location, dtype=target_dtype if same else torch.float32,
                                                trust_remote_code=False, use_safetensors=True)
    try:
        model = PeftModel.from_pretrained(base, str(info.adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"Could not load the adapter in {info.adapter_dir}: {exc}") from exc
    merged = model.merge_and_unload()
    merged.to(target_dtype)
    merged.config.name_or_path = base_name(cfg.base_model)
    merged.save_pretrained(out)
    load_tokenizer(cfg.base_model).save_pretrained(out)
    return str(target_dtype).removeprefix("torch.")


def _write_full(info, cfg, out: Path) -> None:
    from tuner.models import load_tokenizer

    for item in info.adapter_dir.iterdir():
        if item.is_file() and (item.suffix == ".safetensors" or item.name in ("config.json", "generation_config.json")
                               or item.name.endswith(".safetensors.index.json")):
            shutil.copy2(item, out / item.name)
    load_tokenizer(cfg.base_model).save_pretrained(out)


def model_card(info, cfg, kind: str, dtype: str | None) -> str:
    """README.md for the export: what it is, how it was trained, how well, and how to load it."""
    from tuner.dataset import pii_statement

    run = Run(info.run_dir)
    status = run.status()
    evaluation = read_json_object(run.eval_file)
    hub_id = _hub_id(cfg.base_model)
    base = hub_id or base_name(cfg.base_model)
    library = "peft" if kind == "adapter" else "transformers"
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation", "tags:", "- tuner", "- sft"]
    front += ["- lora"] if cfg.method.value == "lora" else []
    front += [f"base_model: {hub_id}"] if hub_id else []
    front += ["---", ""]
    what = {
        "adapter": f"A LoRA adapter for **{base}**",
        "merged": f"**{base}** with a LoRA adapter merged in ({dtype} weights)",
        "full": f"**{base}** fully fine-tuned",
    }[kind]
    lines = front + [f"# {info.run_id}", "", f"{what}, fine-tuned with tuner (run `{info.run_id}`).", ""]
    if cfg.base_model.lower() in ("default", "smollm2") or base.endswith("SmolLM2-135M-Instruct"):
        lines += ["The base weights tuner trained on were dequantized from the Q4_1 GGUF of SmolLM2-135M-Instruct; "
                  "loaded onto the original weights the adapter behaves nearly, not exactly, the same.", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    for key in ("method", "quantization", "lora_r", "lora_alpha", "target_modules", "learning_rate", "num_epochs",
                "max_steps", "batch_size", "grad_accum", "max_length", "preset"):
        lines.append(f"| {key} | {cfg.to_dict()[key]} |")
    facts = {k: status.get(k) for k in ("step", "train_loss", "first_eval_loss", "eval_loss", "tokens_trained", "wall_s")
             if status.get(k) is not None}
    if facts:
        lines += ["", "## Results", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.items()]
    lines += evaluation_section(evaluation)
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")']
    lines += ['messages = [{"role": "user", "content": "Where is my order?"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
              "return_dict=True)",
              "out = model.generate(**inputs, max_new_tokens=200)",
              "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))", "```", ""]
    # last on purpose: a published Space's README puts its table of the data right under this section
    lines += ["## Data", "", data_sentence(info.run_dir), "", pii_statement(run.data_report()), ""]
    return "\n".join(lines)


def evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    """The card's evaluation (tuner.evaluate's eval.json): which way to ship, then each way's numbers."""
    from tuner.evaluate import COLUMN_LABELS, COLUMNS, cell_text, table_metrics
    from tuner.memorisation import METRIC

    memorised = ((evaluation.get("metrics") or {}).get(METRIC) or {}).get("sentence")
    metrics = {k: m for k, m in table_metrics(evaluation.get("metrics") or {}) if isinstance(m, dict)}
    if not metrics:
        return []
    three = evaluation.get("three_way") or {}
    columns = [c for c in COLUMNS if any(c in m for m in metrics.values())]  # an older eval.json: base and tuned
    lines = ["", "## Evaluation (prompting, retrieval, tuning)" if three else "## Evaluation (base vs tuned)", ""]
    if three:
        lines += [f"**{three['sentence']}.** On {len(evaluation.get('rows') or [])} held-out questions: the base "
                  f"model told the brand brief; the same shown the {three['k']} training conversations most like "
                  f"each question; the tuned model.", ""]
    lines += ["| metric | " + " | ".join(COLUMN_LABELS[c] for c in columns) + " | meaning |",
              "|---|" + "---|" * len(columns) + "---|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(cell_text(m.get(c)) for c in columns)
                     + f" | {cell_text(m.get('explain', ''))} |")
    if memorised:
        lines += ["", f"What the tuned model memorised: {memorised}."]
    return lines


def data_sentence(run_dir: Path) -> str:
    """How many conversations the run trained and validated on (the examples of its train/validation files)."""
    from tuner.messages import read_examples

    run = Run(run_dir)
    n_train, n_val = (len(read_examples(run.data_file(name))) if run.data_file(name).is_file() else 0
                      for name in ("train.jsonl", "validation.jsonl"))
    return (f"Trained on {n_train} conversation{'s' if n_train != 1 else ''}; {n_val} more "
            f"{'were' if n_val != 1 else 'was'} held out for validation. They are not part of this folder.")


def export(run_dir: str | Path, to_dir: str | Path, merge: bool = False, push_to: str | None = None,
           token: str | None = None, private: bool = True, dtype: str = "auto") -> Path:
    """Write the run's adapter (or the merged model) with a model card into `to_dir`; push it if asked.

    Returns the folder. `dtype` applies to merged models ('auto': the base's 16-bit dtype, else
    bfloat16). Raises TunerError with the folder kept when the push fails.
    """
    from tuner.playground import read_run

    if push_to is not None:
        if not REPO_ID_RE.match(push_to):
            raise TunerError(f"'{push_to}' is not a model repository id; use the form 'your-name/model-name'.")
        if not token:
            raise TunerError("Pushing to the Hub needs a token with write access (--token, or HF_TOKEN in the "
                             "environment).")
    info = read_run(run_dir)  # completed, safetensors only, adapter inside the run folder
    cfg = Run(info.run_dir).config()
    out = Path(to_dir).expanduser().resolve()
    prepare_target(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        saved_dtype = None
        if info.method == "full":
            kind = "full"
            _write_full(info, cfg, tmp)
        elif merge:
            kind = "merged"
            saved_dtype = _write_merged(info, cfg, tmp, dtype)
        else:
            kind = "adapter"
            _write_adapter(info, cfg, tmp)
        (tmp / "README.md").write_text(model_card(info, cfg, kind, saved_dtype), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps({
            "run": info.run_id, "kind": kind, "base_model": _hub_id(cfg.base_model) or base_name(cfg.base_model),
            "dtype": saved_dtype, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a half-written export is never left under the asked name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to is not None:
        assert token is not None
        push(out, push_to, token, private=private)
    return out


def push(folder: Path, repo_id: str, token: str, private: bool = True) -> str:
    """Upload `folder` to a Hub model repository (created private by default); returns its URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload from tuner")
    except Exception as exc:  # offline, bad token, no permission: one message, never the token
        detail = f"{type(exc).__name__}: {exc}".replace(token, "***").rstrip(". ")
        if "offline" in detail.lower() or "connect" in detail.lower() or "resolve" in detail.lower():
            hint = "The Hugging Face Hub cannot be reached from here (offline). Upload the folder from a connected machine."
        else:
            hint = "Check that the token has write access and that the repository name is yours."
        # from None: the original exception (which may carry request headers) stays out of tracebacks
        raise TunerError(f"Could not push to {repo_id}: {detail[:300]}. {hint} The export is in {folder}.") from None
    return f"https://huggingface.co/{repo_id}"


# -- CLI ------------------------------------------------------------------------------------------
