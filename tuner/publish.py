"""Publish a completed run as its own small chat Space: a folder that runs anywhere, pushed if asked.

`publish(run, to_dir)` writes:

    app.py              gr.ChatInterface, streamed with TextIteratorStreamer (a copy of tuner/space_app.py)
    space_config.json   title, system prompt, sampling defaults, example prompts, where the weights are
    requirements.txt    only what app.py needs
    README.md           Space metadata block + model card (base, data, settings, results)
    tokenizer/          the base model's tokenizer (prompts render as in `python -m tuner chat`)
    adapter/            the LoRA adapter, unless --merge
    base/               the base model when the Space cannot fetch it: the embedded default as its GGUF file
    model/              the merged (--merge) or fully fine-tuned model

The app never imports tuner, and it renders prompts and samples like `python -m tuner chat`, so a
greedy reply in the Space is the reply the playground gave.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tuner.errors import TunerError

APP_TEMPLATE = Path(__file__).with_name("space_app.py")
CONFIG_FILE = "space_config.json"
EXAMPLES = 5  # example prompts shown under the chat
EXAMPLE_CHARS = 300  # longer validation prompts are not good buttons
SPACE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# what a model or adapter folder needs at inference; never pickles, optimizer state or checkpoints
WEIGHT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "tokenizer*")
# Hub storage: big binaries go through LFS when someone pushes the folder with plain git
GITATTRIBUTES = "\n".join(f"{p} filter=lfs diff=lfs merge=lfs -text" for p in ("*.gguf", "*.safetensors")) + "\n"


class PushFailed(TunerError):
    """The folder was written, but the push to the Hub did not happen; `command` pushes it by hand."""

    def __init__(self, message: str, folder: Path, command: str):
        self.folder = folder
        self.command = command
        super().__init__(message)


# -- reading the run ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the converter wrote these files; a bad line is not ours to report here
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                rows.append(row)
    return rows


def system_prompt_of(run: Path, data_prompt: str | None = None) -> str:
    """The brand's system prompt: the one the training data used (as the playground reads it), else
    a `system_prompt` in the run's config or data report, else none."""
    if data_prompt:
        return data_prompt
    for source in (_config_dict(run), _read_json(run / "data" / "report.json").get("config") or {}):
        if isinstance(source, dict) and isinstance(source.get("system_prompt"), str):
            return source["system_prompt"]
    return ""


def example_prompts(run: Path, n: int = EXAMPLES) -> list[str]:
    """The first user message of the first `n` validation conversations (training ones if none)."""
    out: list[str] = []
    for name in ("validation.jsonl", "train.jsonl"):
        for row in _read_jsonl(run / "data" / name):
            first = next((m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
            text = str(first.get("content", "")).strip() if first else ""
            if text and len(text) <= EXAMPLE_CHARS and text not in out:
                out.append(text)
            if len(out) >= n:
                return out
        if out:
            return out
    return out


def _config_dict(run: Path) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


# -- writing the folder ------------------------------------------------------------------------


def _copy_model_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_FILES:
        for item in src.glob(pattern):
            if item.is_file() and item.name != "tuner_source.json":
                shutil.copy2(item, dst / item.name)


def _ship_base(base_model: str, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put the base model where the app finds it. Returns (space_config["base"], facts for the card)."""
    from tuner import models

    if models.is_default(base_model):
        checkpoint = models.default_checkpoint()
        source = _read_json(checkpoint / models.SOURCE_FILE)
        gguf = models.embedded_gguf()
        facts = {"name": models.DEFAULT_MODEL_NAME, "hub_id": models.DEFAULT_HUB_ID, "license": "apache-2.0"}
        if source.get("from") == "gguf" and gguf is not None:
            # the run trained on exactly these dequantized weights; the GGUF is 98 MB, the fp32 copy 540 MB
            (out / "base").mkdir()
            shutil.copy2(gguf, out / "base" / gguf.name)
            return {"kind": "gguf", "path": f"base/{gguf.name}"}, {**facts, "shipped": "gguf"}
        _copy_model_files(checkpoint, out / "base")
        return {"kind": "folder", "path": "base"}, {**facts, "shipped": "folder"}
    location = models.resolve_model(base_model)
    if Path(location).is_dir():  # a local checkpoint no Space can download: ship it
        _copy_model_files(Path(location), out / "base")
        return {"kind": "folder", "path": "base"}, {"name": Path(location).name, "hub_id": None, "shipped": "folder"}
    return {"kind": "hub", "id": location}, {"name": location, "hub_id": location, "shipped": "hub"}


def _merge(run: Path, base_model: str, adapter_dir: Path, out: Path) -> None:
    """Write base + adapter as one model into `out` (export.export when it exists)."""
    try:
        from tuner import export
    except ImportError:
        export = None  # type: ignore[assignment]
    if export is not None and hasattr(export, "export"):
        export.export(run, out, merge=True)
        return
    # fallback until tuner/export.py lands: merge in fp32, store in bf16 to halve the download
    import torch
    from peft import PeftModel

    from tuner.models import load_model

    base = load_model(base_model, quantization="none", dtype=torch.float32, dev="cpu")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(out)


def _requirements(adapter: bool, gguf: bool, default_base: bool) -> str:
    """Only what app.py imports, with the floors of tuner's own requirements.txt."""
    from importlib.metadata import PackageNotFoundError, version

    floors: dict[str, str] = {}
    ours = Path(__file__).resolve().parent.parent / "requirements.txt"
    if ours.is_file():
        for line in ours.read_text().splitlines():
            spec = line.split("#")[0].strip()
            name = re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0].lower()
            if name:
                floors[name] = spec
    names = ["torch", "transformers", "safetensors"]
    if adapter:
        names.append("peft")
    if gguf:
        names.append("gguf")  # transformers needs it to read the GGUF base
    if not default_base:
        names.append("sentencepiece")  # some other bases' tokenizers need it
    try:
        gradio = f"gradio=={version('gradio')}"  # the same version the README's sdk_version pins
    except PackageNotFoundError:
        gradio = floors.get("gradio", "gradio")
    lines = [gradio] + [floors.get(n, n) for n in names]
    return "# What app.py needs. A Space installs this with pip; so can you: pip install -r requirements.txt\n" + "\n".join(lines) + "\n"


def upload_commands(folder: Path, space_id: str | None) -> str:
    """The shell commands that create the Space and upload the folder by hand (no token in them)."""
    space = space_id or "YOUR-NAME/SPACE-NAME"
    q = shlex.quote
    return (
        f"hf repos create {q(space)} --repo-type space --space-sdk gradio --private --exist-ok && "
        f"hf upload {q(space)} {q(str(folder))} . --repo-type space"
    )


def default_folder(run: str | Path) -> Path:
    """Where the app publishes a run when no folder is given: `tuner_home()/spaces/<run id>`."""
    from tuner.paths import resolve_run, tuner_home

    return tuner_home() / "spaces" / resolve_run(run).name


def _prepare_target(to_dir: Path) -> None:
    if to_dir.exists() and not to_dir.is_dir():
        raise TunerError(f"{to_dir} is a file; give a folder to publish into.")
    if to_dir.is_dir() and any(to_dir.iterdir()) and not (to_dir / CONFIG_FILE).is_file():
        # never delete a folder we did not write
        raise TunerError(f"{to_dir} is not empty and is not a published Space folder; pick a new or empty folder.")


def publish(
    run_dir: str | Path,
    to_dir: str | Path | None = None,
    merge: bool = False,
    title: str | None = None,
    system_prompt: str | None = None,
    push_to: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Write a standalone chat Space for a completed run into `to_dir` (and push it to `push_to`).

    Returns {folder, files, size_bytes, weights, base, system_prompt, examples, upload_command,
    url, pushed}. Raises TunerError for a run that cannot be published, and PushFailed (the folder
    is ready then) when the push fails. The token is used for the push only and stored nowhere.
    """
    from tuner import models
    from tuner.config import GenerationConfig, TrainConfig
    from tuner.limits import MAX_INPUT_TOKENS, MAX_NEW_TOKENS
    from tuner.playground import END_OF_TURN_TOKENS, read_run

    info = read_run(run_dir)  # a completed run whose weights are safetensors inside its folder
    run = info.run_dir
    status = _read_json(run / "status.json")
    if push_to is not None and not SPACE_ID_RE.match(push_to):
        raise TunerError(f"'{push_to}' is not a Space id; use the form 'your-name/space-name'.")
    cfg = TrainConfig.load(run / "config.yaml")
    target = Path(to_dir).expanduser().resolve() if to_dir is not None else default_folder(run)
    _prepare_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    prompt = system_prompt if system_prompt is not None else system_prompt_of(run, info.system_prompt)
    default_base = models.is_default(cfg.base_model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        space: dict[str, Any] = {"adapter": None}
        if info.method == "full":
            _copy_model_files(info.adapter_dir, tmp / "model")
            weights = "full"
        elif merge:
            _merge(run, cfg.base_model, info.adapter_dir, tmp / "model")
            weights = "merged"
        else:
            weights = "adapter"
        if weights == "adapter":
            space["base"], base_facts = _ship_base(cfg.base_model, tmp)
            _copy_model_files(info.adapter_dir, tmp / "adapter")
            for name in ("README.md", *(p.name for p in (tmp / "adapter").glob("tokenizer*")), "chat_template.jinja"):
                (tmp / "adapter" / name).unlink(missing_ok=True)  # the card is README.md; the tokenizer is tokenizer/
            space["adapter"] = "adapter"
        else:
            space["base"] = {"kind": "folder", "path": "model"}
            hub_id = models.DEFAULT_HUB_ID if default_base else (cfg.base_model if SPACE_ID_RE.match(cfg.base_model) else None)
            base_facts = {"name": models.DEFAULT_MODEL_NAME if default_base else cfg.base_model, "hub_id": hub_id,
                          "license": "apache-2.0" if default_base else None, "shipped": weights}
        # the base model's tokenizer, as the playground uses it, so prompts render the same
        models.load_tokenizer(cfg.base_model).save_pretrained(tmp / "tokenizer")
        space["tokenizer"] = "tokenizer"

        title = (title or "").strip() or f"Tuned chat ({run.name})"
        examples = example_prompts(run)
        generation = GenerationConfig()
        space.update(
            title=title,
            description=f"A {base_facts['name']} model fine-tuned with tuner (run {run.name}).",
            system_prompt=prompt,
            generation={k: getattr(generation, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")},
            examples=examples,
            max_new_tokens_limit=MAX_NEW_TOKENS,
            max_input_tokens=MAX_INPUT_TOKENS,
            end_of_turn_markers=list(END_OF_TURN_TOKENS),
            run_id=run.name,
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(space, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        shutil.copy2(APP_TEMPLATE, tmp / "app.py")
        (tmp / "requirements.txt").write_text(
            _requirements(space["adapter"] is not None, space["base"]["kind"] == "gguf", default_base)
        )
        (tmp / ".gitattributes").write_text(GITATTRIBUTES)
        (tmp / "README.md").write_text(
            _readme(run, cfg, space, base_facts, weights, status, push_to), encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder is never seen as published
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    files = sorted(p for p in target.rglob("*") if p.is_file())
    result: dict[str, Any] = {
        "folder": str(target),
        "files": [str(p.relative_to(target)) for p in files],
        "size_bytes": sum(p.stat().st_size for p in files),
        "weights": weights,
        "base": space["base"],
        "system_prompt": prompt,
        "examples": examples,
        "upload_command": upload_commands(target, push_to),
        "url": None,
        "pushed": False,
    }
    if push_to:
        result["url"] = push(target, push_to, token=token)
        result["pushed"] = True
    return result


# -- the model card --------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    rows = [(k, v) for k, v in rows if v is not None and v != ""]
    if not rows:
        return ""
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows) + "\n"


def _numbers(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten the numeric figures of eval.json into (name, value) rows."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _numbers(item, f"{prefix}{key}" if not prefix else f"{prefix} / {key}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append((prefix, value))
    return out


def _readme(
    run: Path,
    cfg: Any,
    space: dict[str, Any],
    base: dict[str, Any],
    weights: str,
    status: dict[str, Any],
    push_to: str | None,
) -> str:
    from importlib.metadata import version

    import yaml

    meta: dict[str, Any] = {
        "title": space["title"][:60],
        "emoji": "💬",
        "colorFrom": "indigo",
        "colorTo": "pink",
        "sdk": "gradio",
        "sdk_version": version("gradio"),
        "app_file": "app.py",
        "pinned": False,
        "short_description": f"Chat with a fine-tuned {base['name']}"[:60],
    }
    if base.get("license"):
        meta["license"] = base["license"]
    if base.get("hub_id"):
        meta["models"] = [base["hub_id"]]
    if space["base"]["kind"] == "hub":
        meta["preload_from_hub"] = [space["base"]["id"]]  # downloaded at build time, not at every start
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"

    shipped = {
        "gguf": (
            f"The base model is the embedded default, {base['name']}, shipped in this folder as "
            f"`{space['base'].get('path')}` (its Q4_1 GGUF file, 98 MB, Apache-2.0). At start-up "
            "transformers dequantizes it to fp32 (about 10 s, needs the `gguf` package): these are exactly "
            "the weights the run was trained on, so the Space needs no network and replies like "
            "`python -m tuner chat`. The fp32 safetensors copy would be 540 MB; the GGUF keeps the folder small."
        ),
        "folder": "The base model's weights are in `base/` (safetensors), so the Space needs no network.",
        "hub": f"The base model `{space['base'].get('id')}` is downloaded from the Hub when the Space builds.",
        "merged": "The adapter is merged into the base model: `model/` holds the whole model (safetensors).",
        "full": "Every weight was fine-tuned: `model/` holds the whole model (safetensors).",
    }[base.get("shipped", weights)]

    lines = [head, f"# {space['title']}\n\n", f"{space['description']}\n\n", "## Model\n\n"]
    lora = None
    if weights != "full":
        lora = f"r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, target={cfg.target_modules}"
    lines.append(
        _table(
            [
                ("Base model", f"{base['name']}" + (f" ([{base['hub_id']}](https://huggingface.co/{base['hub_id']}))" if base.get("hub_id") else "")),
                ("Weights", {"adapter": "LoRA adapter in `adapter/` + base model", "merged": "merged model in `model/`", "full": "fully fine-tuned model in `model/`"}[weights]),
                ("LoRA", lora),
                ("Training quantization", getattr(cfg.quantization, "value", cfg.quantization)),
            ]
        )
    )
    lines.append(f"\n{shipped}\n")

    report = _read_json(run / "data" / "report.json")
    train_rows = _read_jsonl(run / "data" / "train.jsonl")
    val_rows = _read_jsonl(run / "data" / "validation.jsonl")
    data_rows: list[tuple[str, Any]] = [
        ("Training conversations", report.get("train_examples", len(train_rows))),
        ("Validation conversations", report.get("validation_examples", len(val_rows))),
    ]
    if not report:
        turns = [sum(1 for m in r["messages"] if m.get("role") == "assistant") for r in train_rows]
        data_rows.append(("Assistant replies (training)", sum(turns)))
    data_rows += [(f"stats: {k}", v) for k, v in _numbers(report.get("stats", {}))]
    pii = report.get("pii") or {}
    if pii:
        data_rows.append(("PII redacted", ", ".join(f"{k}: {v}" for k, v in sorted(pii.items()))))
    if report.get("files"):
        data_rows.append(("Source files", len(report["files"])))
    lines += ["\n## Data\n\n", _table(data_rows)]

    settings = cfg.to_dict()
    keep = ("preset", "method", "learning_rate", "num_epochs", "max_steps", "batch_size", "grad_accum", "max_length",
            "assistant_only_loss", "packing", "seed")
    lines += ["\n## Training settings\n\n", _table([(k, settings.get(k)) for k in keep])]
    result_rows = [
        ("Steps", status.get("step")),
        ("Training loss (last)", status.get("train_loss")),
        ("Validation loss before training", status.get("first_eval_loss")),
        ("Validation loss after training", status.get("eval_loss")),
        ("Tokens trained", status.get("tokens_trained")),
        ("Wall time (s)", status.get("wall_s")),
    ]
    if any(v is not None for _, v in result_rows):
        lines += ["\n## Training results\n\n", _table(result_rows)]
    evaluation = _read_json(run / "eval.json")
    if evaluation:
        lines += ["\n## Evaluation (held-out prompts, base vs tuned)\n\n", _table(_numbers(evaluation)[:40])]

    gen = space["generation"]
    lines += [
        "\n## Chat settings\n\n",
        f"System prompt: {'`' + space['system_prompt'][:300].replace('`', '') + '`' if space['system_prompt'] else 'none (the model default)'}.\n\n",
        f"Sampling: temperature {gen['temperature']} ({'greedy' if gen['temperature'] == 0 else 'sampled'}), "
        f"top-p {gen['top_p']}, repetition penalty {gen['repetition_penalty']}, up to {gen['max_new_tokens']} new tokens. "
        "All of them, and the example prompts, live in `space_config.json`; the app's Settings panel changes them per chat.\n",
        "\n## Run it\n\n",
        "```bash\npip install -r requirements.txt\npython app.py   # http://127.0.0.1:7860\n```\n",
        "\n## Push it to the Hub by hand\n\n",
        "Log in once (`hf auth login`, or set `HF_TOKEN`), then:\n\n",
        f"```bash\n{upload_commands(Path('.'), push_to).replace(' && ', chr(10))}\n```\n\n",
        "(with an older huggingface_hub: `huggingface-cli upload SPACE_ID . . --repo-type=space`).\n",
    ]
    return "".join(lines)


# -- pushing and packing -----------------------------------------------------------------------


def push(folder: str | Path, space_id: str, token: str | None = None, private: bool = True) -> str:
    """Create the Space (private by default) and upload `folder`; returns the Space URL."""
    folder = Path(folder)
    command = upload_commands(folder, space_id)
    token = token or os.environ.get("HF_TOKEN") or None
    if not token:
        raise PushFailed(
            f"No Hugging Face token: set HF_TOKEN or pass --token. The folder {folder} is ready; push it with:\n  {command}",
            folder,
            command,
        )
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True, token=token)
        upload_folder(repo_id=space_id, folder_path=folder, repo_type="space", token=token,
                      commit_message="Publish from tuner")
    except Exception as exc:  # offline, bad token, no permission: the folder stays ready either way
        # security: library messages may echo request details; never let the token through
        reason = f"{type(exc).__name__}: {exc}".replace(token, "***").splitlines()[0][:300]
        raise PushFailed(
            f"Could not push to the Space {space_id} ({reason}). The folder {folder} is ready; "
            f"push it with:\n  {command}",
            folder,
            command,
        ) from None
    return f"https://huggingface.co/spaces/{space_id}"


def zip_folder(folder: str | Path, zip_path: str | Path | None = None) -> Path:
    """Pack a published folder into a zip for download (weights stored, text compressed)."""
    folder = Path(folder).resolve()
    if not (folder / CONFIG_FILE).is_file():
        raise TunerError(f"{folder} is not a published Space folder (no {CONFIG_FILE}).")
    out = Path(zip_path) if zip_path is not None else folder.with_suffix(".zip")
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for item in sorted(folder.rglob("*")):
            if item.is_file():
                # weights do not compress; deflating them only costs time
                method = zipfile.ZIP_STORED if item.suffix in (".gguf", ".safetensors") else zipfile.ZIP_DEFLATED
                zf.write(item, Path(folder.name) / item.relative_to(folder), compress_type=method)
    os.replace(tmp, out)
    return out


# -- command line ------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="Run id, or path to a run folder.")
    parser.add_argument("--to", default=None, help="Folder to write (default: TUNER_HOME/spaces/<run id>).")
    parser.add_argument("--merge", action="store_true", help="Ship the adapter merged into the base model.")
    parser.add_argument("--title", default=None, help="Title of the chat page and the Space.")
    parser.add_argument("--system-prompt", default=None,
                        help="System prompt of the chat (default: the one in the run's data, if any).")
    parser.add_argument("--push", default=None, metavar="SPACE_ID", help="Also create the private Space your-name/space-name and upload.")
    parser.add_argument("--token", default=None, help="Hugging Face token for --push (default: $HF_TOKEN, which keeps it out of your shell history).")
    parser.add_argument("--zip", action="store_true", help="Also write the folder as a .zip next to it.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def cli(args: argparse.Namespace) -> int:
    result = publish(args.run, args.to, merge=args.merge, title=args.title, system_prompt=args.system_prompt,
                     push_to=args.push, token=args.token)
    if args.zip:
        result["zip"] = str(zip_folder(result["folder"]))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(f"Published {result['weights']} to {result['folder']} ({result['size_bytes'] / 1e6:.0f} MB, {len(result['files'])} files)")
    print(f"Run it:  cd {shlex.quote(result['folder'])} && pip install -r requirements.txt && python app.py")
    if result.get("zip"):
        print(f"Zip:     {result['zip']}")
    if result["url"]:
        print(f"Space:   {result['url']}")
    else:
        print(f"Push it: {result['upload_command']}")
    return 0
