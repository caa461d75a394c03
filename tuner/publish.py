"""Publish a completed run as its own small chat Space: a folder that runs anywhere, pushed if asked.

`publish(run, to_dir)` writes:

    app.py              gr.ChatInterface, streamed with TextIteratorStreamer (a copy of tuner/resources/space/app.py)
    space_config.json   title, system prompt, sampling defaults, example prompts, where the weights are
    requirements.txt    only what app.py needs
    README.md           Space metadata block + model card (base, data, settings, results, evaluation)
    adapter/            the LoRA adapter + the base tokenizer (tuner.export), unless --merge
    base/               the base model when a Space cannot fetch it: the embedded default as its GGUF file
    model/              instead of both: the merged (--merge) or fully fine-tuned model (tuner.export)

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
from tuner.runs import Run, read_json_object

APP_TEMPLATE = Path(__file__).parent / "resources" / "space" / "app.py"  # a template, not a module
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
    for source in (Run(run).config_values(), read_json_object(Run(run).data_file("report.json")).get("config") or {}):
        if isinstance(source, dict) and isinstance(source.get("system_prompt"), str):
            return source["system_prompt"]
    return ""


def example_prompts(run: Path, n: int = EXAMPLES) -> list[str]:
    """The first user message of the first `n` validation conversations (training ones if none)."""
    out: list[str] = []
    for name in ("validation.jsonl", "train.jsonl"):
        for row in _read_jsonl(Run(run).data_file(name)):
            first = next((m for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
            text = str(first.get("content", "")).strip() if first else ""
            if text and len(text) <= EXAMPLE_CHARS and text not in out:
                out.append(text)
            if len(out) >= n:
                return out
        if out:
            return out
    return out


# -- writing the folder ------------------------------------------------------------------------


def _copy_model_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_FILES:
        for item in src.glob(pattern):
            if item.is_file() and item.name != "tuner_source.json":
                shutil.copy2(item, dst / item.name)


def _base_facts(base_model: str, shipped: str) -> dict[str, Any]:
    """Name, Hub id and licence of the base model, for the Space metadata and the card."""
    from tuner import models

    if models.is_default(base_model):
        return {"name": models.DEFAULT_MODEL_NAME, "hub_id": models.DEFAULT_HUB_ID, "license": "apache-2.0",
                "shipped": shipped}
    local = Path(base_model).expanduser().is_dir()
    return {"name": Path(base_model).name if local else base_model, "hub_id": None if local else base_model,
            "license": None, "shipped": shipped}


def _ship_base(base_model: str, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put the base model where the app finds it. Returns (space_config["base"], facts for the card)."""
    from tuner import models

    location = models.resolve_model(base_model)
    if models.is_default(base_model):
        source = read_json_object(Path(location) / models.SOURCE_FILE)
        gguf = models.embedded_gguf()
        if source.get("from") == "gguf" and gguf is not None:
            # the run trained on exactly these dequantized weights; the GGUF is 98 MB, the fp32 copy 540 MB
            (out / "base").mkdir()
            shutil.copy2(gguf, out / "base" / gguf.name)
            return {"kind": "gguf", "path": f"base/{gguf.name}"}, _base_facts(base_model, "gguf")
    if Path(location).is_dir():  # a local checkpoint (or the default fetched from the Hub): ship it
        _copy_model_files(Path(location), out / "base")
        return {"kind": "folder", "path": "base"}, _base_facts(base_model, "folder")
    return {"kind": "hub", "id": location}, _base_facts(base_model, "hub")


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
    from tuner.paths import tuner_home
    from tuner.runs import resolve

    return tuner_home() / "spaces" / resolve(run).id


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
    personal_data (the card's sentence about it), url, pushed}. Raises TunerError for a run that cannot be published, and PushFailed (the folder
    is ready then) when the push fails. The token is used for the push only and stored nowhere.

    Long on purpose: the Space folder is written whole in one temporary folder and renamed at the end, and its steps share that folder.
    """
    from tuner import export, models
    from tuner.config import GenerationConfig
    from tuner.dataset import pii_statement
    from tuner.limits import MAX_INPUT_TOKENS, MAX_NEW_TOKENS
    from tuner.playground import END_OF_TURN_TOKENS, read_run

    info = read_run(run_dir)  # a completed run whose weights are safetensors inside its folder
    run = info.run_dir
    if push_to is not None and not SPACE_ID_RE.match(push_to):
        raise TunerError(f"'{push_to}' is not a Space id; use the form 'your-name/space-name'.")
    cfg = Run(run).config()
    target = Path(to_dir).expanduser().resolve() if to_dir is not None else default_folder(run)
    _prepare_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    prompt = system_prompt if system_prompt is not None else system_prompt_of(run, info.system_prompt)
    default_base = models.is_default(cfg.base_model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if info.method == "full" or merge:
            # the whole model in one folder; its tokenizer is the base's, as in the playground
            export.export(run, tmp / "model", merge=merge)
            weights = "full" if info.method == "full" else "merged"
            space: dict[str, Any] = {"base": {"kind": "folder", "path": "model"}, "adapter": None, "tokenizer": "model"}
            base_facts = _base_facts(cfg.base_model, weights)
        else:
            weights = "adapter"
            base, base_facts = _ship_base(cfg.base_model, tmp)
            export.export(run, tmp / "adapter")  # adapter + the base tokenizer + its model card
            space = {"base": base, "adapter": "adapter", "tokenizer": "adapter"}
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
            _readme(run, space, base_facts, weights, tmp / ("adapter" if weights == "adapter" else "model"), push_to),
            encoding="utf-8",
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
        "personal_data": pii_statement(Run(run).data_report()),  # what the card says about it
        "url": None,
        "pushed": False,
    }
    if push_to:
        result["url"] = push(target, push_to, token=token)
        result["pushed"] = True
    return result


# -- the README: Space metadata + model card -----------------------------------------------------


def _table(rows: list[tuple[str, Any]]) -> str:
    rows = [(k, v) for k, v in rows if v is not None and v != ""]
    if not rows:
        return ""
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def _numbers(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten the numbers of a nested dict (the data report's stats) into (name, value) rows."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _numbers(item, f"{prefix} / {key}" if prefix else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append((prefix, value))
    return out


def _weights_card(folder: Path) -> str:
    """tuner.export's model card of the weights folder, as sections of this README."""
    text = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    if text.startswith("---"):
        text = text.split("---", 2)[2]  # its own metadata block: the Space has one already
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]  # its title is the run id; the Space has its own
    # the card's headings one level down, and its loading example pointed at the folder inside the Space
    return "\n".join(("#" + line if line.startswith("## ") else line) for line in lines).replace(
        "PATH_OR_REPO_OF_THIS_FOLDER", folder.name
    ).strip() + "\n"


def _data_rows(run: Path) -> list[tuple[str, Any]]:
    report = read_json_object(Run(run).data_file("report.json"))
    train = _read_jsonl(Run(run).data_file("train.jsonl"))
    val = _read_jsonl(Run(run).data_file("validation.jsonl"))
    replies = sum(1 for r in train for m in r["messages"] if isinstance(m, dict) and m.get("role") == "assistant")
    rows: list[tuple[str, Any]] = [
        ("Training conversations", len(train)),
        ("Validation conversations", len(val)),
        ("Assistant replies trained on", replies),
    ]
    if report.get("files"):
        rows.append(("Source files", len(report["files"])))
    if isinstance(report.get("dropped"), list):
        rows.append(("Conversations dropped by the converter", len(report["dropped"])))
    rows += [(k, v) for k, v in _numbers(report.get("stats", {}))][:20]
    return rows  # personal data: the model card's Data section says it, from the same report


def _readme(run: Path, space: dict[str, Any], base: dict[str, Any], weights: str, weights_dir: Path,
            push_to: str | None) -> str:
    from importlib.metadata import version

    import yaml

    meta: dict[str, Any] = {
        "title": space["title"][:60],
        "emoji": "💬",
        "colorFrom": "indigo",
        "colorTo": "pink",
        "sdk": "gradio",
        "sdk_version": version("gradio"),  # the Space runs the gradio the app was written against
        "app_file": "app.py",
        "pinned": False,
        "short_description": f"Chat with a fine-tuned {base['name']}"[:60],
    }
    if base.get("license"):
        meta["license"] = base["license"]
    if base.get("hub_id"):
        meta["models"] = [base["hub_id"]]
    if space["base"]["kind"] == "hub":
        meta["preload_from_hub"] = [space["base"]["id"]]  # downloaded when the Space builds, not at each start
    shipped = {
        "gguf": (
            f"**The base model travels inside this folder.** It is the embedded default, {base['name']}, as its "
            f"Q4_1 GGUF file `{space['base'].get('path')}` (98 MB, Apache-2.0). At start-up transformers "
            "dequantizes it to fp32 (about 10 s; that is why `gguf` is in requirements.txt). These are exactly "
            "the weights the run was trained on, so the Space needs no network and a greedy reply here is the "
            "reply `python -m tuner chat` gives. (The same weights as fp32 safetensors would be 540 MB.)"
        ),
        "folder": "**The base model travels inside this folder** (`base/`, safetensors), so the Space needs no network.",
        "hub": f"The base model `{space['base'].get('id')}` is downloaded from the Hub when the Space builds.",
        "merged": (
            "**The adapter is merged into the base model**: `model/` holds the whole model (16-bit safetensors, "
            "computed in fp32 on CPU), so the Space needs no network. Rounding to 16 bits can change a word here "
            "and there compared with `python -m tuner chat`; publish without --merge for identical replies."
        ),
        "full": "**Every weight was fine-tuned**: `model/` holds the whole model, so the Space needs no network.",
    }[base["shipped"]]
    gen = space["generation"]
    system = space["system_prompt"]
    lines = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n",
        f"# {space['title']}\n",
        f"{space['description']} Weights: "
        + {"adapter": "a LoRA adapter (`adapter/`) on the base model", "merged": "the merged model (`model/`)",
           "full": "the fully fine-tuned model (`model/`)"}[weights] + ".\n",
        shipped + "\n",
        "## Model card\n",
        _weights_card(weights_dir),  # ends with its Data section, which this table continues
        _table(_data_rows(run)),
        "## Chat settings\n",
        ("System prompt: `" + system[:500].replace("`", "'") + "`\n") if system
        else "System prompt: none (the chat template's default).\n",
        f"Sampling: temperature {gen['temperature']} ({'greedy' if gen['temperature'] == 0 else 'sampled'}), "
        f"top-p {gen['top_p']}, repetition penalty {gen['repetition_penalty']}, up to {gen['max_new_tokens']} new "
        "tokens. These, the example prompts and the title live in `space_config.json`; the Settings panel under "
        "the chat changes them per conversation.\n",
        "## Run it\n",
        "```bash\npip install -r requirements.txt\npython app.py   # http://127.0.0.1:7860\n```\n",
        "## Push it to the Hub by hand\n",
        "Log in once (`hf auth login`, or set `HF_TOKEN`), then, in this folder:\n",
        f"```bash\n{upload_commands(Path('.'), push_to).replace(' && ', chr(10))}\n```\n",
        "With an older huggingface_hub: `huggingface-cli upload SPACE_ID . . --repo-type=space`.\n",
    ]
    return "\n".join(lines)


# -- pushing and packing -----------------------------------------------------------------------


def push(folder: str | Path, space_id: str, token: str | None = None, private: bool = True) -> str:
    """Create the Space (private by default) and upload `folder` with `token`; returns the Space URL."""
    folder = Path(folder)
    command = upload_commands(folder, space_id)
    # security: no fallback to a token in the environment here; a server must not push with its own
    if not token:
        raise PushFailed(
            f"No Hugging Face token was given (--token, or HF_TOKEN on the command line). The folder {folder} is ready; "
            f"push it with:\n  {command}",
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
    parser.add_argument("--to", default=None, metavar="DIR", help="Folder to write (default: TUNER_HOME/spaces/<run id>).")
    parser.add_argument("--merge", action="store_true", help="Ship the adapter merged into the base model.")
    parser.add_argument("--title", default=None, help="Title of the chat page and the Space.")
    parser.add_argument("--system-prompt", default=None,
                        help="System prompt of the chat (default: the one in the run's data, if any).")
    parser.add_argument("--push", default=None, metavar="SPACE_ID", help="Also create the private Space your-name/space-name and upload.")
    parser.add_argument("--token", default=None, help="Hugging Face token for --push (default: $HF_TOKEN, which keeps it out of your shell history).")
    parser.add_argument("--zip", action="store_true", help="Also write the folder as a .zip next to it.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def cli(args: argparse.Namespace) -> int:
    token = (args.token or os.environ.get("HF_TOKEN") or None) if args.push else None
    result = publish(args.run, args.to, merge=args.merge, title=args.title, system_prompt=args.system_prompt,
                     push_to=args.push, token=token)
    from tuner import audit

    audit.record_cli("publish", args.run, "command line" + (f", pushed to {args.push}" if result.get("url") else ""))
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
