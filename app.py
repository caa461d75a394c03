"""tuner's page: upload conversation logs, fine-tune a small model on them, compare it with the base.

Gradio only. Every handler calls the `tuner` package and turns its TunerError into a plain
gr.Error. What belongs to one browser (uploads, converted examples, chats) lives in gr.State and
component values, never in module globals; a run is a folder on disk, so a reloaded page finds
its training again. Run ids from the page or the API are checked with `check_run_id` before
they touch the disk.

    python app.py            # http://127.0.0.1:7860
    TUNER_AUTH=me:secret python app.py   # ask for a user name and password
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from tuner import limits
from tuner.config import PRESETS, ConvertConfig, GenerationConfig, TrainConfig
from tuner.errors import DataError, RunNotFound, TunerError
from tuner.paths import check_run_id, persistent_storage, runs_dir, uploads_dir

ROOT = Path(__file__).resolve().parent
SAMPLES_DIR = ROOT / "datasets"
SAMPLE_FILES = ["kettle_transcripts.txt"]  # "Try the sample": a raw chat log (datasets/README.md)
UPLOAD_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt"]  # what tuner.formats reads
POLL_SECONDS = 2.0  # how often the Train tab reads status.json / metrics.jsonl
PREVIEW_EXAMPLES = 20  # examples the Data tab can preview
HISTOGRAM_EXAMPLES = 50_000  # examples measured for the length histogram
FILES_COLUMNS = ["file", "format", "what it is", "rows read", "kept", "dropped"]
DROPPED_COLUMNS = ["file", "line", "why", "reason"]
LOG_LINES = 14  # last lines of train.log shown under the loss plot (the box shows them all)
CHAT_CONCURRENCY = 4  # chats handled at once; the model itself generates one batch at a time
EVAL_PROMPTS = 10  # held-out prompts the page evaluates by default ...
EVAL_MAX_PROMPTS = 50  # ... and at most (the CLI can do more)
EXPORT_TTL_S = 3600  # prepared zips are removed after an hour
RUN_STATES_ACTIVE = ("queued", "running")

log = logging.getLogger("tuner.app")

# Settings the Train tab shows; the rest keep their preset/default values.
MAIN_SETTINGS = ["max_steps", "num_epochs", "learning_rate", "lora_r", "batch_size", "max_length"]
MORE_SETTINGS = ["quantization", "method", "lora_alpha", "lora_dropout", "grad_accum", "eval_steps", "save_steps",
                 "early_stopping_patience", "warmup_ratio", "packing", "assistant_only_loss", "precision",
                 "gradient_checkpointing", "seed"]
SETTING_CHOICES = {  # text settings with a closed set of values (validated in TrainConfig.__post_init__)
    "precision": ["auto", "bf16", "fp16", "fp32"],
    "gradient_checkpointing": ["auto", "on", "off"],
}
SETTING_LABELS = {
    "max_steps": "Max steps", "num_epochs": "Epochs", "learning_rate": "Learning rate", "lora_r": "LoRA rank",
    "batch_size": "Batch size", "max_length": "Max length (tokens)", "quantization": "Quantization",
    "method": "Method", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "grad_accum": "Gradient accumulation",
    "eval_steps": "Evaluate every N steps", "save_steps": "Checkpoint every N steps",
    "early_stopping_patience": "Early stopping patience", "warmup_ratio": "Warm-up share",
    "packing": "Pack short examples", "assistant_only_loss": "Learn from replies only", "seed": "Seed",
    "precision": "Precision", "gradient_checkpointing": "Gradient checkpointing",
}


# -- errors ------------------------------------------------------------------------------------------


def _plain_error(exc: BaseException, secret: str = "") -> gr.Error:
    """The message a person sees for `exc`; the traceback goes to the server log only (never with a secret)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, TunerError):
        return gr.Error(str(exc), print_exception=False)
    if secret:  # security: a library's message or traceback might quote the token
        log.error("unexpected %s in a handler that holds a token", type(exc).__name__)
    else:
        log.error("unexpected %s in a handler", type(exc).__name__, exc_info=exc)
    return gr.Error(f"Something went wrong ({type(exc).__name__}). Try again; if it repeats, "
                    "reload the page and check the server log.", print_exception=False)


def friendly(fn: Callable) -> Callable:
    """Turn tuner's errors (and any other exception) into a gr.Error in plain words, without a traceback."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _plain_error(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _plain_error(exc) from None

    return wrapper


def md_escape(text: Any) -> str:
    """User-given text (file names, speakers, reasons) shown literally inside Markdown."""
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~])", r"\\\1", str(text))


# -- one browser's data --------------------------------------------------------------------------


def new_session() -> dict[str, Any]:
    """What one browser session owns: its upload folder (by a random id) and its converted data."""
    return {"id": uuid.uuid4().hex, "data_dir": None, "ok": False, "speakers": []}


def session_folder(session: dict[str, Any]) -> Path:
    sid = str((session or {}).get("id", ""))
    if not re.fullmatch(r"[0-9a-f]{32}", sid):  # security: the id names a folder
        raise TunerError("This page's session has expired: reload the page.")
    return uploads_dir() / sid


def end_session(session: dict[str, Any] | None) -> None:
    """Gradio calls this when a session's state expires: its uploads and converted data go."""
    with contextlib.suppress(TunerError):
        shutil.rmtree(session_folder(session or {}), ignore_errors=True)


def take_uploads(files: list[str] | None, session: dict[str, Any]) -> list[Path]:
    """Copy this session's uploads into its own folder, enforcing the server-side limits."""
    files = [f for f in (files or []) if f]
    if not files:
        raise TunerError("Add at least one file first, or press 'Try the sample'.")
    if len(files) > limits.MAX_FILES:
        raise TunerError(f"{len(files)} files is more than the limit of {limits.MAX_FILES} per dataset: "
                         "merge some exports or upload fewer.")
    dest = session_folder(session) / "files"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    out: list[Path] = []
    for f in files:
        src = Path(f)
        if not src.is_file():
            raise TunerError(f"{src.name} is no longer on the server: upload it again.")
        size = src.stat().st_size
        if size > limits.MAX_UPLOAD_BYTES:
            raise DataError(f"is {size / 2**20:.0f} MB; the limit is {limits.MAX_UPLOAD_BYTES / 2**20:.0f} MB "
                            "per file. Split the export.", file=src.name)
        name = re.sub(r"[^\w.\- ]", "_", src.name).lstrip(".") or "upload"
        target = dest / name
        n = 1
        while target.exists():
            n += 1
            target = dest / f"{Path(name).stem}-{n}{Path(name).suffix}"
        shutil.copyfile(src, target)
        out.append(target)
    return out


def sample_files() -> list[str]:
    """The sample export(s) shipped in datasets/ that "Try the sample" loads."""
    return [str(SAMPLES_DIR / name) for name in SAMPLE_FILES if (SAMPLES_DIR / name).is_file()]


# -- runs on disk --------------------------------------------------------------------------------------


def run_folder(run_id: str | None) -> Path:
    """The folder of a run named by id; ids are plain folder names (never paths) under runs_dir()."""
    if not run_id or not str(run_id).strip():
        raise TunerError("Pick a run first.")
    run_id = check_run_id(str(run_id).strip())  # security: rejects '../', '/etc', '%2e%2e' and the like
    path = runs_dir() / run_id
    if not (path / "config.yaml").is_file():
        raise RunNotFound(f"There is no run named '{run_id}'.")
    return path


def list_runs() -> list[dict[str, Any]]:
    from tuner import jobs

    return jobs.list_runs()


def run_choices(only_completed: bool = False) -> list[str]:
    runs = list_runs()
    if only_completed:
        runs = [r for r in runs if r.get("status") == "completed"]
    return [r["id"] for r in runs]


def active_run() -> str | None:
    """The run training now (or queued), else the newest run, for a page that opens."""
    runs = list_runs()
    for r in runs:
        if r.get("status") in RUN_STATES_ACTIVE:
            return r["id"]
    return runs[0]["id"] if runs else None


@functools.lru_cache(maxsize=2)
def tokenizer_for(base_model: str):
    """Tokenizers are shared, read-only model files: cached per process, never per user."""
    from tuner.models import load_tokenizer

    return load_tokenizer(base_model)


@functools.lru_cache(maxsize=1)
def playground():
    """The one Playground of this process: model weights are shared by every session, chats are not."""
    from tuner.playground import Playground

    return Playground()


# -- Data tab ----------------------------------------------------------------------------------------


def report_markdown(report: dict[str, Any]) -> str:
    """The validation report's headline: verdict, counts, PII, warnings (user text escaped)."""
    stats = report.get("stats") or {}
    lines = []
    if report.get("ok"):
        lines.append(f"### Ready to train: {report.get('train_examples', 0)} training and "
                     f"{report.get('validation_examples', 0)} validation examples")
    else:
        lines.append("### Not enough to train on yet")
        if report.get("reason"):
            reason = md_escape(report["reason"])
            lines.append(reason[:1].upper() + reason[1:] + ".")
    facts = [f"{stats.get('conversations_read', 0):,} conversations read"]
    tokens = stats.get("tokens") or {}
    if tokens.get("total"):
        facts.append(f"{tokens['total']:,} tokens (median {tokens['median']:g} per example, "
                     f"longest {tokens['max']:,}; limit {stats.get('max_length')})")
    learned = (stats.get("assistant_tokens") or {}).get("total")
    if learned:
        facts.append(f"{learned:,} of them in replies the model learns from")
    if report.get("dropped_total"):
        facts.append(f"{report['dropped_total']} dropped (see the table)")
    if report.get("elapsed_s") is not None:
        facts.append(f"checked in {report['elapsed_s']:.1f} s")
    lines.append(" · ".join(facts))
    estimate = stats.get("train_time_estimate") or {}
    if estimate.get("tokens_per_epoch"):
        lines.append(f"One epoch is about {estimate['tokens_per_epoch']:,} tokens: roughly "
                     f"{estimate['cpu_minutes_per_epoch']} min on a CPU, {estimate['gpu_minutes_per_epoch']} min "
                     "on a GPU with the default model.")
    pii = {k: v for k, v in (report.get("pii") or {}).items() if v}
    if pii:
        found = ", ".join(f"{v} {md_escape(k)}" for k, v in pii.items())
        lines.append(f"**Personal data {'replaced with placeholders' if report.get('pii_redacted') else 'found'}:** "
                     f"{found}" + ("" if report.get("pii_redacted") else " (tick *Redact personal data* to replace it)"))
    warnings = [w for w in report.get("warnings") or [] if not w.startswith("Personal data found")]
    if warnings:
        lines.append("**Warnings**\n\n" + "\n".join(f"- {md_escape(w)}" for w in warnings))
    if report.get("unmapped_speakers"):
        lines.append("**Some speakers have no role.** Tick the ones that are your team (left), then press "
                     "*Check data* again.")
    return "\n\n".join(lines)


def files_table(report: dict[str, Any]) -> pd.DataFrame:
    from tuner.formats import FORMAT_HELP

    rows = [{"file": f.get("file"), "format": f.get("format") or "not recognised",
             "what it is": f.get("error") or FORMAT_HELP.get(f.get("format") or "", ""),
             "rows read": f.get("rows_read"), "kept": f.get("conversations_kept"), "dropped": f.get("dropped")}
            for f in report.get("files") or []]
    return pd.DataFrame(rows, columns=FILES_COLUMNS)


def dropped_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = [{"file": d.get("file"), "line": d.get("line"), "why": d.get("category"), "reason": d.get("reason")}
            for d in report.get("dropped") or []]
    return pd.DataFrame(rows, columns=DROPPED_COLUMNS)


def histogram_plot(frame: pd.DataFrame) -> gr.BarPlot:
    """The bar plot with its bins in numeric order (a nominal axis would sort '128-159' before '32-63')."""
    return gr.BarPlot(value=frame, sort=list(frame["tokens"]) or None)


def token_histogram(data_dir: str | Path | None, base_model: str) -> pd.DataFrame:
    """Examples per token-length bin (chat template included), measured with the model's tokenizer."""
    from tuner.dataset import token_lengths

    convs = read_examples(data_dir, limit=HISTOGRAM_EXAMPLES)
    if not convs:
        return pd.DataFrame({"tokens": pd.Series(dtype="str"), "examples": pd.Series(dtype="int64")})
    tok = tokenizer_for(base_model or "default")
    lengths = token_lengths(tok, tok.apply_chat_template(convs, tokenize=False))
    low, top = min(lengths), max(lengths)
    width = max(8, 2 ** math.ceil(math.log2(max((top - low) / 12, 1))))  # about a dozen round-numbered bins
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // width] = counts.get(n // width, 0) + 1
    rows = [{"tokens": f"{b * width}-{(b + 1) * width - 1}", "examples": counts.get(b, 0)}
            for b in range(low // width, top // width + 1)]
    return pd.DataFrame(rows, columns=["tokens", "examples"])


def read_examples(data_dir: str | Path | None, limit: int = PREVIEW_EXAMPLES,
                  files: tuple[str, ...] = ("train.jsonl", "validation.jsonl")) -> list[list[dict[str, str]]]:
    """The first converted examples (their messages), for the preview and the histogram."""
    out: list[list[dict[str, str]]] = []
    for name in files if data_dir else ():
        path = Path(data_dir) / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if len(out) >= limit:
                    return out
                out.append([{"role": m["role"], "content": m["content"]} for m in json.loads(line)["messages"]])
    return out


def shown(text: str) -> str:
    """Message text for a gr.Chatbot with render_markdown=False: shown literally, HTML never interpreted."""
    return html.escape(text, quote=False)


def bubbles(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """User/assistant messages as chat bubbles showing their exact text (a system prompt is shown apart)."""
    return [{"role": m["role"], "content": shown(m["content"])} for m in messages if m["role"] in ("user", "assistant")]


def system_of(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in messages if m["role"] == "system"), "")


def trained_tokens(messages: list[dict[str, str]], base_model: str) -> list[tuple[str, str | None]]:
    """The example as the model sees it, with the tokens it learns from marked 'learned'."""
    from tuner.chat_template import training_template

    tok = tokenizer_for(base_model or "default")
    enc = tok.apply_chat_template(messages, chat_template=training_template(tok), tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    spans: list[tuple[str, str | None]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            spans.append((tok.decode(ids[start:i]), "learned" if mask[start] else None))
            start = i
    return spans


@friendly
def show_example(index: float | None, session: dict[str, Any], base_model: str):
    """Preview one converted example as chat bubbles and as the tokens the model learns from."""
    examples = read_examples((session or {}).get("data_dir"))
    if not examples:
        return "", [], []
    i = min(max(int(index or 1), 1), len(examples)) - 1
    return system_of(examples[i]), bubbles(examples[i]), trained_tokens(examples[i], base_model)


@friendly
def load_sample():
    """Put the sample exports into the file box (the change event then converts them)."""
    files = sample_files()
    if not files:
        raise TunerError("No sample files are installed in datasets/.")
    return files


@friendly
def convert_data(files: list[str] | None, system_prompt: str, redact_pii: bool, team_speakers: list[str] | None,
                 base_model: str, session: dict[str, Any], progress: gr.Progress = gr.Progress()):  # noqa: B008
    """Convert this session's uploads into examples and report what was kept, dropped and found."""
    from tuner import dataset

    session = dict(session or new_session())
    paths = take_uploads(files, session)
    team = list(team_speakers or [])
    others = [s for s in session.get("speakers", []) if s not in team]
    cfg = ConvertConfig(system_prompt=(system_prompt or "").strip(), redact_pii=bool(redact_pii),
                        assistant_names=team, user_names=others)
    out_dir = session_folder(session) / "data"
    shutil.rmtree(out_dir, ignore_errors=True)
    progress(0, desc="Loading the tokenizer…")
    report = dataset.convert(paths, out_dir, cfg, tokenizer=tokenizer_for(base_model or "default"),
                             progress=lambda fraction, text: progress(fraction, desc=text))
    unmapped = list(report.get("unmapped_speakers") or [])
    session["speakers"] = sorted(set(session.get("speakers", [])) | set(unmapped))
    session.update(data_dir=str(out_dir), ok=bool(report.get("ok")))
    examples = read_examples(out_dir)
    first = examples[0] if examples else []
    speakers = gr.update(choices=session["speakers"], value=[s for s in team if s in session["speakers"]],
                         visible=bool(session["speakers"]))
    return (
        report_markdown(report),
        files_table(report),
        dropped_table(report),
        histogram_plot(token_histogram(out_dir, base_model)),
        gr.update(maximum=max(len(examples), 2), value=1, visible=len(examples) > 1),  # a slider needs min < max
        system_of(first),
        bubbles(first),
        trained_tokens(first, base_model) if first else [],
        speakers,
        gr.update(interactive=session["ok"]),
        gr.update(interactive=session["ok"]),
        session,
    )


# -- Train tab -------------------------------------------------------------------------------------


def preset_values(preset: str) -> dict[str, Any]:
    return TrainConfig.from_preset(preset).to_dict()


def setting_component(name: str, value: Any) -> gr.components.Component:
    """One TrainConfig field as a widget, labelled, with the field's own help text."""
    help_text = TrainConfig.help()[name]
    label = SETTING_LABELS.get(name, name.replace("_", " "))
    default = getattr(TrainConfig(), name)
    if isinstance(default, bool):
        return gr.Checkbox(value=value, label=label, info=help_text)
    if isinstance(default, Enum):
        return gr.Radio([e.value for e in type(default)], value=value, label=label, info=help_text)
    if name in SETTING_CHOICES:
        return gr.Radio(SETTING_CHOICES[name], value=value, label=label, info=help_text)
    if isinstance(default, str):
        return gr.Textbox(value=value, label=label, info=help_text)
    if isinstance(default, int):
        return gr.Number(value=value, label=label, info=help_text, precision=0)
    return gr.Number(value=value, label=label, info=help_text)


def build_train_config(base_model: str, preset: str, names: list[str], values: tuple[Any, ...]) -> TrainConfig:
    """The one place the page's settings become a TrainConfig (validated there)."""
    settings = preset_values(preset or "quick")
    for name, value in zip(names, values, strict=True):
        if value is None or value == "":
            raise TunerError(f"{SETTING_LABELS.get(name, name)} is empty: give it a value.")
        default = getattr(TrainConfig(), name)
        if isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int) and not isinstance(default, bool):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        settings[name] = value
    settings["base_model"] = (base_model or "default").strip()
    settings["preset"] = preset or "custom"
    return TrainConfig.from_dict(settings)


def apply_preset(preset: str):
    values = preset_values(preset)
    return [values[n] for n in MAIN_SETTINGS + MORE_SETTINGS]


@friendly
def estimate_run(session: dict[str, Any], base_model: str, preset: str, *values: Any) -> str:
    """Time and memory the run should take, before it starts."""
    data_dir = (session or {}).get("data_dir")
    if not data_dir or not (session or {}).get("ok"):
        return "Check your data on the **Data** tab first: the estimate needs the examples."
    from tuner import jobs

    cfg = build_train_config(base_model, preset, MAIN_SETTINGS + MORE_SETTINGS, values)
    est = jobs.estimate(cfg, data_dir)
    text = f"**Estimate:** {est['steps']} steps over {est['examples']} examples (~{est['tokens']:,} tokens)"
    if est["time_s"] is not None:
        text += f", about **{fmt_duration(est['time_s'])}**"
    if est["memory_mb"] is not None:
        text += f" and **{est['memory_mb'] / 1024:.1f} GB** of memory"
    text += f" on this machine's {est['device']}."
    if est["speed"]:
        basis = "measured on an earlier run here" if est["measured"] else "a reference speed; the first run measures it"
        text += f" Speed: {est['speed']:,.0f} tokens/s ({basis})."
    else:
        text += " (No time estimate for a Hub model that is not downloaded yet.)"
    return text


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def progress_html(status: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    """A progress bar with step, ETA and losses; built from numbers only (no user text)."""
    state = str(status.get("status", "unknown"))
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    pct = 100.0 * step / total if total else (100.0 if state == "completed" else 0.0)
    last = metrics[-1] if metrics else {}
    bits = [f"step {step} / {total or '?'}"]
    if state in RUN_STATES_ACTIVE and last.get("eta_s") is not None:
        bits.append(f"about {fmt_duration(last['eta_s'])} left")
    if status.get("wall_s"):
        bits.append(f"{'running for' if state in RUN_STATES_ACTIVE else 'took'} {fmt_duration(status['wall_s'])}")
    if last.get("tokens_per_s"):
        bits.append(f"{last['tokens_per_s']:.0f} tokens/s")
    if status.get("first_eval_loss") is not None and status.get("eval_loss") is not None:
        bits.append(f"eval loss {status['first_eval_loss']:.3f} → {status['eval_loss']:.3f}")
    label = {"queued": "Queued", "running": "Training", "completed": "Completed", "failed": "Failed",
             "cancelled": "Cancelled", "interrupted": "Interrupted (resume it)"}.get(state, state)
    error = f'<p class="run-error">{html.escape(str(status["error"]))}</p>' if status.get("error") else ""
    return (f'<div class="run-progress" data-status="{html.escape(state)}">'
            f'<div class="run-line"><b>{html.escape(label)}</b> · {html.escape(" · ".join(bits))}</div>'
            f'<progress max="100" value="{pct:.1f}"></progress>{error}</div>')


def loss_frame(metrics: list[dict[str, Any]]) -> pd.DataFrame:
    """Train and eval loss by step, long format for gr.LinePlot's color=series."""
    rows = []
    for m in metrics:
        if m.get("loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["loss"]), "series": "train loss"})
        if m.get("eval_loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["eval_loss"]), "series": "eval loss"})
    if not rows:  # typed even when empty: the plot keeps the axis types of the first frame it gets
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                             "series": pd.Series(dtype="str")})
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def log_lines(run_dir: Path, metrics: list[dict[str, Any]]) -> str:
    """The last lines of the run's train.log, newest first (progress bars redraw with \\r: keep their last state)."""
    path = run_dir / "train.log"
    if path.is_file():
        with open(path, "rb") as fh:
            fh.seek(max(path.stat().st_size - 64 * 1024, 0))
            text = fh.read().decode("utf-8", errors="replace")
        lines = [line.split("\r")[-1].rstrip() for line in text.split("\n")]
        return "\n".join(reversed([line for line in lines if line.strip()][-LOG_LINES:]))
    return "\n".join(f"step {m.get('step')}  loss={m.get('loss')}  eval_loss={m.get('eval_loss')}"
                     for m in reversed(metrics))


@friendly
def run_status(run_id: str | None):
    """Everything the Train tab shows about one run, read from its folder."""
    from tuner import jobs

    if not run_id:
        return ("<p>No run yet. Check your data, then press <b>Start training</b>.</p>", loss_frame([]), "",
                gr.update(visible=False), gr.update(visible=False), gr.Timer(active=False))
    run_dir = run_folder(run_id)
    status = jobs.read_status(run_dir)
    metrics = jobs.read_metrics(run_dir)
    state = status.get("status")
    active = state in RUN_STATES_ACTIVE
    last_step = max([int(status.get("max_steps") or 0)] + [int(m["step"]) for m in metrics])
    return (
        progress_html(status, metrics),
        gr.LinePlot(value=loss_frame(metrics), x_lim=[0, max(last_step, 1)]),
        log_lines(run_dir, metrics),
        gr.update(visible=active),
        gr.update(visible=state in ("interrupted", "cancelled", "failed")),
        gr.Timer(active=active),
    )


@friendly
def start_training(session: dict[str, Any], base_model: str, preset: str, *values: Any):
    """Prepare a run folder from this session's examples and start training it in a subprocess."""
    from tuner import jobs, train

    if not (session or {}).get("ok") or not session.get("data_dir"):
        raise TunerError("There is nothing valid to train on yet: check your data on the Data tab first.")
    cfg = build_train_config(base_model, preset, MAIN_SETTINGS + MORE_SETTINGS, values)
    if (running := jobs.active_job()) is not None:
        # refuse before creating a run folder that could not start
        raise TunerError(f"Another training run is in progress on this machine ({running.get('holder')}). One job "
                         "runs at a time: wait for it to finish or cancel it, then start again.")
    run_dir = train.prepare_run(cfg, session["data_dir"])
    try:
        jobs.start(run_dir)
    except TunerError:
        jobs.delete_run(run_dir.name)  # lost a race for the machine: leave no never-started run behind
        raise
    gr.Info(f"Training started: run {run_dir.name}. You can close this tab; it keeps training.")
    return run_dir.name


@friendly
def cancel_run(run_id: str | None) -> str:
    from tuner import jobs

    run_dir = run_folder(run_id)
    jobs.cancel(run_dir)
    gr.Info(f"Cancelling run {run_dir.name}…")
    return run_dir.name


@friendly
def resume_run(run_id: str | None) -> str:
    from tuner import jobs

    run_dir = run_folder(run_id)
    jobs.start(run_dir, resume=True)
    gr.Info(f"Resuming run {run_dir.name} from its last checkpoint.")
    return run_dir.name


# -- Playground tab --------------------------------------------------------------------------------


def new_chats() -> dict[str, list[dict[str, str]]]:
    """One session's playground conversations, raw text per column (the Chatbots show them escaped)."""
    return {"base": [], "tuned": [], "prompted": []}


def chat_views(chats: dict[str, list[dict[str, str]]]) -> tuple[list, list, list]:
    return bubbles(chats["base"]), bubbles(chats["tuned"]), bubbles(chats["prompted"])


def forget_column(column: str, chats: dict[str, list[dict[str, str]]] | None) -> dict[str, list[dict[str, str]]]:
    return {**(chats or new_chats()), column: []}


@friendly
def chat(message: str, run_id: str | None, with_prompted: bool, max_new_tokens: float, temperature: float,
         top_p: float, seed: float, repetition_penalty: float, chats: dict[str, list[dict[str, str]]] | None):
    """Send one message to every column and stream the replies side by side."""
    from tuner.playground import BASE, NOTICE_KEY, PROMPTED, TUNED

    message = (message or "").strip()
    if not message:
        raise TunerError("Type a message first.")
    run_dir = run_folder(run_id) if run_id else None
    settings = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_p=float(top_p), seed=int(seed), repetition_penalty=float(repetition_penalty))
    chats = {c: list(h) for c, h in (chats or new_chats()).items()}
    pg = playground()
    if run_dir is not None:
        pg.load_run(run_dir)
    else:
        pg.load_base()
    columns = [BASE] + ([TUNED] if run_dir else []) + ([PROMPTED] if with_prompted else [])
    history = {c: chats[c] for c in columns}
    for c in columns:
        chats[c] = chats[c] + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    yield "", *chat_views(chats), chats
    # without a run, say so explicitly: None would mean "the last run loaded", maybe by another session
    no_run = {"system_prompt": "", "brand_brief": ""} if run_dir is None else {}
    noticed = False
    for partial in pg.stream_compare(history, message, columns, settings, run=run_dir, **no_run):
        if partial.get(NOTICE_KEY) and not noticed:
            gr.Warning(partial[NOTICE_KEY])
            noticed = True
        for c in columns:
            chats[c][-1] = {"role": "assistant", "content": partial.get(c, "")}
        yield "", *chat_views(chats), chats


def eval_tables(result: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    def cell(v: Any) -> Any:
        if isinstance(v, dict):
            return f"{v.get('median', '')} ({v.get('p10', '')}-{v.get('p90', '')})"
        return "—" if v is None else v

    metrics = [{"metric": name, "base": cell(m.get("base")), "tuned": cell(m.get("tuned")),
                "reference": cell(m.get("reference")), "what it means": m.get("explain", "")}
               for name, m in (result.get("metrics") or {}).items()]
    rows = [{"prompt": r.get("prompt"), "reference": r.get("reference"), "base": r.get("base"),
             "tuned": r.get("tuned")} for r in result.get("rows") or []]
    return (pd.DataFrame(metrics, columns=["metric", "base", "tuned", "reference", "what it means"]),
            pd.DataFrame(rows, columns=["prompt", "reference", "base", "tuned"]))


@friendly
def evaluate_run(run_id: str | None, prompts: float, max_new_tokens: float, temperature: float, top_p: float,
                 seed: float, repetition_penalty: float, progress: gr.Progress = gr.Progress()):  # noqa: B008
    """Answer held-out prompts with base and tuned, and score the voice."""
    from tuner import evaluate

    run_dir = run_folder(run_id)
    if not 1 <= int(prompts or 0) <= EVAL_MAX_PROMPTS:
        raise TunerError(f"Evaluate between 1 and {EVAL_MAX_PROMPTS} prompts here; the CLI (`python -m tuner eval`) "
                         "does more.")
    settings = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_p=float(top_p), seed=int(seed), repetition_penalty=float(repetition_penalty))
    progress(0, desc="Generating replies to held-out prompts…")
    result = evaluate.evaluate(run_dir, settings=settings, limit=int(prompts), playground=playground())
    return eval_tables(result)


@friendly
def saved_evaluation(run_id: str | None):
    """The last evaluation of a run (eval.json), if it has one."""
    if not run_id:
        return eval_tables({})
    path = run_folder(run_id) / "eval.json"
    if not path.is_file():
        return eval_tables({})
    return eval_tables(json.loads(path.read_text(encoding="utf-8")))


# -- Runs tab --------------------------------------------------------------------------------------


def _round(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def runs_frame() -> pd.DataFrame:
    rows = []
    for r in list_runs():
        rows.append({"run": r.get("id"), "status": r.get("status"), "base model": r.get("base_model"),
                     "preset": r.get("preset"), "steps": f"{r.get('step') or 0}/{r.get('max_steps') or '?'}",
                     "train loss": _round(r.get("train_loss")),
                     "eval loss": f"{_round(r.get('first_eval_loss'))} → {_round(r.get('eval_loss'))}"
                     if r.get("eval_loss") is not None else None})
    return pd.DataFrame(rows, columns=["run", "status", "base model", "preset", "steps", "train loss", "eval loss"])


@friendly
def run_details(run_id: str | None) -> str:
    """A run's outcome, then every setting it was trained with (its config.yaml)."""
    from tuner import jobs

    if not run_id:
        return "Pick a run."
    run_dir = run_folder(run_id)
    status = jobs.read_status(run_dir)
    cfg = TrainConfig.load(run_dir / "config.yaml").to_dict()
    facts = {
        "status": status.get("status"),
        "steps": f"{status.get('step') or 0} / {status.get('max_steps') or '?'}",
        "train loss": _round(status.get("train_loss")),
        "eval loss": f"{_round(status.get('first_eval_loss'))} → {_round(status.get('eval_loss'))}"
        if status.get("eval_loss") is not None else None,
        "tokens trained": f"{status['tokens_trained']:,}" if status.get("tokens_trained") else None,
        "time": fmt_duration(status["wall_s"]) if status.get("wall_s") else None,
        "peak memory": f"{status['peak_memory_mb'] / 1024:.1f} GB" if status.get("peak_memory_mb") else None,
        "error": status.get("error"),
    }
    lines = [f"#### {md_escape(run_dir.name)}", "", "| result | |", "|---|---|"]
    lines += [f"| {k} | {md_escape(v)} |" for k, v in facts.items() if v is not None]
    pairs = [(k.replace("_", " "), v) for k, v in cfg.items()]
    half = (len(pairs) + 1) // 2  # two columns of settings keep the table short
    lines += ["", "| setting | value | setting | value |", "|---|---|---|---|"]
    for (k1, v1), right in zip(pairs[:half], pairs[half:] + [("", "")], strict=False):
        lines.append(f"| {k1} | {md_escape(v1)} | {right[0]} | {md_escape(right[1])} |")
    return "\n".join(lines)


def _export_dir() -> Path:
    """A fresh folder for a zip the page hands out; older ones are removed (gradio keeps its copy)."""
    base = Path(tempfile.gettempdir()) / "tuner-exports"
    base.mkdir(exist_ok=True)
    now = time.time()
    for old in base.iterdir():
        if now - old.stat().st_mtime > EXPORT_TTL_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=base))


@friendly
def download_run(run_id: str | None, merge: bool = False) -> str:
    """Zip the run's adapter (or the model merged with it) for download."""
    from tuner import export

    run_dir = run_folder(run_id)
    work = _export_dir()
    folder = work / (f"{run_dir.name}-merged" if merge else f"{run_dir.name}-adapter")
    folder = export.export(run_dir, folder, merge=merge)
    return shutil.make_archive(str(folder), "zip", root_dir=work, base_dir=folder.name)


@friendly
def download_adapter(run_id: str | None) -> str:
    return download_run(run_id, merge=False)


@friendly
def download_merged(run_id: str | None) -> str:
    return download_run(run_id, merge=True)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_run(run_id: str | None, repo_id: str, token: str, merge: bool, private: bool):
    """Push the adapter (or merged model) to the Hub. The token is used once, never stored or shown."""
    from tuner import export

    token = (token or "").strip()
    try:
        run_dir = run_folder(run_id)
        repo_id = (repo_id or "").strip()
        if not token:
            # security: never fall back to a token in the server's environment (a Space owner's HF_TOKEN)
            raise TunerError("Paste a Hugging Face token with write access; it is used for this push only.")
        work = _export_dir()
        try:
            export.export(run_dir, work / run_dir.name, merge=bool(merge), push_to=repo_id, token=token,
                          private=bool(private))
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the folder was only a staging area for the upload
    except Exception as exc:
        # the staging folder is gone, so its path means nothing to the user; the token never shows
        message = re.sub(r"\s*The export is in \S+\.?$", "", str(_plain_error(exc, token).message))
        raise gr.Error(_scrub(message, token), print_exception=False) from None
    url = f"https://huggingface.co/{repo_id}"
    return f"Pushed {'the merged model' if merge else 'the adapter'} to [{md_escape(repo_id)}]({url}).", ""


@friendly
def delete_run(run_id: str | None):
    from tuner import jobs

    run_dir = run_folder(run_id)
    jobs.delete_run(run_dir.name)
    gr.Info(f"Deleted run {run_dir.name}.")
    return (*refresh_runs(), gr.Row(visible=False))


@friendly
def refresh_runs():
    """The runs table and every run picker, from the disk."""
    choices = run_choices()
    completed = run_choices(only_completed=True)
    return (runs_frame(), gr.update(choices=choices), gr.update(choices=completed),
            gr.update(choices=choices))


@friendly
def playground_runs(current: str | None):
    """Completed runs for the playground picker, keeping the current pick while it is still there."""
    completed = run_choices(only_completed=True)
    return gr.update(choices=completed, value=current if current in completed else (completed[0] if completed else None))


def publish_space(run_id: str | None, title: str, merge: bool, space_id: str, token: str):
    """Write a standalone chat Space folder for the run, hand it out as a zip, and push it if asked."""
    from tuner import publish

    token, space_id = (token or "").strip(), (space_id or "").strip()
    try:
        run_dir = run_folder(run_id)
        if space_id and not token:
            # security: never fall back to a token in the server's environment
            raise TunerError("Pushing a Space needs your Hugging Face token (write); it is used for this push only.")
        work = _export_dir()
        try:
            result = publish.publish(run_dir, work / f"{run_dir.name}-space", merge=bool(merge), title=title or None,
                                     push_to=space_id or None, token=token or None)
            folder, pushed = Path(result["folder"]), result.get("url")
            note = f"Pushed to [{md_escape(space_id)}]({pushed})." if pushed else ""
        except publish.PushFailed as exc:
            folder, result = exc.folder, None
            reason = str(exc).split(". The folder")[0]
            note = f"{md_escape(_scrub(reason, token))}. Download the zip below and upload it yourself."
        zipped = publish.zip_folder(folder)
    except Exception as exc:
        raise gr.Error(_scrub(str(_plain_error(exc, token).message), token), print_exception=False) from None
    size = zipped.stat().st_size / 1e6
    text = (f"Wrote the Space folder ({size:.0f} MB zipped). Unzip it and run "
            "`pip install -r requirements.txt && python app.py`, or upload it as a Space.")
    return (text + ("\n\n" + note if note else "")), str(zipped), ""


# -- page load ---------------------------------------------------------------------------------------


def storage_notice() -> str:
    """On a Space: runs are shared by its visitors (unless behind TUNER_AUTH), and without persistent
    storage they vanish on restart."""
    if not os.environ.get("SPACE_ID"):
        return ""
    notes = []
    if not os.environ.get("TUNER_AUTH"):
        notes.append("**Runs on this Space are shared**: if it is public, everyone who opens it sees the run list "
                     "and can chat with, download or delete a run (uploads and chats stay in your browser). For "
                     "your company's transcripts, duplicate it as a private Space or set `TUNER_AUTH`.")
    if not persistent_storage():
        notes.append("**This Space has no persistent storage**: runs are lost when it restarts or sleeps. "
                     "Download the adapter or push it to the Hub from the **Runs** tab when training ends.")
    return "\n\n".join(notes)


@friendly
def page_load():
    """A (re)opened page shows the run that is training now, read from disk, not from memory."""
    current = active_run()
    choices = run_choices()
    completed = run_choices(only_completed=True)
    notice = storage_notice()
    return (
        gr.update(choices=choices, value=current),
        gr.update(choices=completed, value=completed[0] if completed else None),
        gr.update(choices=choices, value=current),
        runs_frame(),
        gr.update(value=notice, visible=bool(notice)),
    )


# -- layout --------------------------------------------------------------------------------------------

CSS = """
.run-progress progress { width: 100%; height: 14px; accent-color: var(--color-accent); }
.run-progress .run-line { margin-bottom: 6px; }
.run-progress .run-error { color: var(--error-text-color, #b91c1c); white-space: pre-wrap; }
#preview .bot, #preview .message.bot { background: #fef3c7 !important; border-color: #f59e0b !important; }
"""


def build_demo() -> gr.Blocks:
    """Lay out the four tabs and wire every event (each with an api_name for gradio_client)."""
    defaults = preset_values("quick")
    # defaults from the dataclass (an instance would refuse a server limit below its default length)
    gen = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    gen["max_new_tokens"] = min(gen["max_new_tokens"], limits.MAX_NEW_TOKENS)
    gen_help = {f: GenerationConfig.__dataclass_fields__[f].metadata["help"] for f in GenerationConfig.__dataclass_fields__}
    setting_names = MAIN_SETTINGS + MORE_SETTINGS

    with gr.Blocks(title="tuner: fine-tune a chatbot on your support logs", delete_cache=(1800, 3600)) as demo:
        session = gr.State(new_session, delete_callback=end_session)
        chats = gr.State(new_chats)
        gr.Markdown("# tuner\nTurn your support conversations into a chatbot that answers in your voice: "
                    "**1** check the data, **2** train, **3** compare base and tuned, **4** take the model home.")
        notice = gr.Markdown(visible=False, elem_id="storage-notice")

        with gr.Tabs() as tabs:
            # ---- 1. Data
            with gr.Tab("1. Data", id="data"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        files = gr.File(label="Conversation exports (JSONL, JSON, CSV, TXT)", file_count="multiple",
                                        file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")
                        sample_btn = gr.Button("Try the sample", elem_id="try-sample")
                        system_prompt = gr.Textbox(label="Brand brief (system prompt)", lines=3,
                                                   info=ConvertConfig.__dataclass_fields__["system_prompt"].metadata["help"],
                                                   placeholder="You are the support assistant of …")
                        redact = gr.Checkbox(label="Redact personal data (PII)",
                                             info=ConvertConfig.__dataclass_fields__["redact_pii"].metadata["help"])
                        speakers = gr.CheckboxGroup(label="Which of these speakers are your team (the assistant)?",
                                                    info="Unticked speakers are treated as customers.", visible=False)
                        check_btn = gr.Button("Check data", variant="secondary", elem_id="check-data")
                    with gr.Column(scale=3, min_width=420):
                        report_md = gr.Markdown("Upload your exports (or try the sample) to see what tuner makes "
                                                "of them.", elem_id="report")
                        files_df = gr.Dataframe(headers=FILES_COLUMNS, label="Files and their detected format",
                                                interactive=False, elem_id="files-table", wrap=True)
                        hist = gr.BarPlot(x="tokens", y="examples", label="Examples by length (tokens)", sort=None,
                                          height=220)
                        dropped_df = gr.Dataframe(headers=DROPPED_COLUMNS, label="Dropped rows (file, line, reason)",
                                                  interactive=False, max_height=260, elem_id="dropped-table",
                                                  wrap=True)
                with gr.Row():
                    with gr.Column():
                        example_idx = gr.Slider(1, 2, value=1, step=1, label="Example", visible=False)
                        preview_system = gr.Textbox(label="System prompt of this example (context, not learned)",
                                                    interactive=False, lines=1, max_lines=4,
                                                    placeholder="None: the chat template adds the model's default.")
                        preview = gr.Chatbot(label="Preview: highlighted replies are what the model learns to write",
                                             elem_id="preview", height=360, feedback_options=None,
                                             render_markdown=False, buttons=[], autoscroll=False)
                    with gr.Column():
                        learned = gr.HighlightedText(label="The same example as the model reads it "
                                                           "(marked: tokens it is trained on)",
                                                     color_map={"learned": "#f59e0b"}, show_legend=True,
                                                     elem_id="learned")
                to_train = gr.Button("Next: train on these examples →", variant="primary", interactive=False,
                                     elem_id="to-train")

            # ---- 2. Train
            with gr.Tab("2. Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        base_model = gr.Dropdown(["default"], value="default", allow_custom_value=True,
                                                 label="Base model",
                                                 info="'default' is the embedded SmolLM2-135M-Instruct; or type a "
                                                      "Hub id like org/name (safetensors only, no remote code).")
                        preset = gr.Radio(list(PRESETS), value="quick", label="Preset",
                                          info="quick: a minute or two on a laptop CPU; balanced and thorough: "
                                               "more epochs, better results, need a GPU for big data.")
                        setting_inputs = {}
                        with gr.Group():
                            for name in MAIN_SETTINGS:
                                setting_inputs[name] = setting_component(name, defaults[name])
                        with gr.Accordion("More settings", open=False):
                            for name in MORE_SETTINGS:
                                setting_inputs[name] = setting_component(name, defaults[name])
                        estimate_md = gr.Markdown(elem_id="estimate")
                        estimate_btn = gr.Button("Estimate time and memory")
                        start_btn = gr.Button("Start training", variant="primary", interactive=False,
                                              elem_id="start-training")
                    with gr.Column(scale=3, min_width=420):
                        train_run = gr.Dropdown(label="Run", allow_custom_value=True, elem_id="train-run",
                                                info="Training runs in the background: closing this tab does not "
                                                     "stop it.")
                        progress = gr.HTML(elem_id="progress")
                        loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss (orange: train, blue: held-out eval)",
                                                color_map={"train loss": "#f97316", "eval loss": "#2563eb"},
                                                x_title="step", y_title="loss", height=280, elem_id="loss-plot")
                        with gr.Row():
                            cancel_btn = gr.Button("Cancel training", variant="stop", visible=False, elem_id="cancel")
                            resume_btn = gr.Button("Resume from the last checkpoint", visible=False,
                                                   elem_id="resume")
                        train_log = gr.Textbox(label="Log (train.log, newest first)", lines=8, max_lines=LOG_LINES,
                                               interactive=False,
                                               autoscroll=False, elem_id="train-log")
                timer = gr.Timer(POLL_SECONDS, active=False)

            # ---- 3. Playground
            with gr.Tab("3. Playground", id="playground") as playground_tab:
                with gr.Row():
                    pg_run = gr.Dropdown(label="Tuned run", allow_custom_value=True, scale=3, elem_id="pg-run",
                                         info="A completed run; without one only the base model answers.")
                    with_prompted = gr.Checkbox(False, label="Also show prompt-only",
                                                info="The base model told the brand brief: what prompting alone gets.",
                                                scale=2)
                with gr.Row(equal_height=True):
                    base_chat = gr.Chatbot(label="Base model", height=380, elem_id="chat-base", feedback_options=None,
                                           render_markdown=False, buttons=["copy_all"])
                    tuned_chat = gr.Chatbot(label="Tuned", height=380, elem_id="chat-tuned", feedback_options=None,
                                            render_markdown=False, buttons=["copy_all"])
                    prompted_chat = gr.Chatbot(label="Prompt-only", height=380, visible=False,
                                               elem_id="chat-prompted", feedback_options=None,
                                               render_markdown=False, buttons=["copy_all"])
                with gr.Row():
                    msg = gr.Textbox(placeholder="Ask what your customers ask… (Enter sends to every column)",
                                     show_label=False, scale=5, elem_id="chat-input", max_length=4000)
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    clear_btn = gr.Button("Clear", scale=1)
                with gr.Accordion("Sampling (the same for every column, so the comparison is fair)",
                                  open=False), gr.Row():
                    max_new = gr.Slider(1, limits.MAX_NEW_TOKENS, value=gen["max_new_tokens"], step=1, elem_id="max-new",
                                        label="Max new tokens", info=gen_help["max_new_tokens"])
                    temperature = gr.Slider(0.0, 2.0, value=gen["temperature"], step=0.05, label="Temperature",
                                            info=gen_help["temperature"])
                    top_p = gr.Slider(0.05, 1.0, value=gen["top_p"], step=0.05, label="Top-p", info=gen_help["top_p"])
                    seed = gr.Number(gen["seed"], precision=0, label="Seed", info=gen_help["seed"])
                    rep = gr.Slider(1.0, 2.0, value=gen["repetition_penalty"], step=0.05, label="Repetition penalty",
                                    info=gen_help["repetition_penalty"])
                with gr.Accordion("Evaluation: did it learn the voice, did it forget anything?", open=False):
                    with gr.Row():
                        eval_prompts = gr.Slider(1, EVAL_MAX_PROMPTS, value=EVAL_PROMPTS, step=1,
                                                 label="Held-out prompts", scale=3,
                                                 info="From the run's validation split; both models answer each.")
                        eval_btn = gr.Button("Evaluate base vs tuned", scale=1)
                    eval_metrics = gr.Dataframe(label="Voice metrics", interactive=False, wrap=True,
                                                elem_id="eval-metrics")
                    eval_rows = gr.Dataframe(label="Replies", interactive=False, wrap=True, max_height=400)

            # ---- 4. Runs
            with gr.Tab("4. Runs", id="runs") as runs_tab:
                runs_df = gr.Dataframe(label="Runs", interactive=False, elem_id="runs-table")
                with gr.Row():
                    runs_pick = gr.Dropdown(label="Run", allow_custom_value=True, scale=3, elem_id="runs-pick")
                    refresh_btn = gr.Button("Refresh", scale=1)
                with gr.Row():
                    with gr.Column():
                        details = gr.Markdown(elem_id="run-details")
                    with gr.Column():
                        gr.Markdown("#### Download")
                        with gr.Row():
                            dl_adapter_btn = gr.Button("Adapter (.zip)")
                            dl_merged_btn = gr.Button("Merged model (.zip)")
                        download = gr.File(label="Download", interactive=False, height=90)
                        gr.Markdown("#### Push to the Hugging Face Hub")
                        repo_id = gr.Textbox(label="Model repository", placeholder="your-name/my-support-bot")
                        token = gr.Textbox(label="Hugging Face token (write)", type="password",
                                           info="Used for this push only: never stored, logged or shown again.")
                        with gr.Row():
                            push_merged = gr.Checkbox(False, label="Merged model instead of the adapter")
                            push_private = gr.Checkbox(True, label="Private repository")
                        push_btn = gr.Button("Push")
                        push_md = gr.Markdown()
                        gr.Markdown("#### Delete")
                        delete_btn = gr.Button("Delete this run…", elem_id="delete-run")
                        with gr.Row(visible=False) as confirm_row:
                            confirm_delete = gr.Button("Yes, delete it and all its files", variant="stop",
                                                       elem_id="confirm-delete")
                            keep_btn = gr.Button("Keep it")
                with gr.Column(elem_id="publish-section", variant="panel"):
                    gr.Markdown("#### Publish as a Space\nA standalone chat page for this run, as a folder you "
                                "can run anywhere or upload as a Hugging Face Space.")
                    with gr.Row():
                        space_title = gr.Textbox(label="Title", placeholder="Kettle & Co. support", scale=3)
                        space_merge = gr.Checkbox(False, label="Merge the adapter into the model", scale=1)
                    with gr.Row():
                        space_id = gr.Textbox(label="Push to Space (optional)", placeholder="your-name/space-name",
                                              info="Created private. Leave empty to only download the folder.")
                        space_token = gr.Textbox(label="Hugging Face token (write)", type="password",
                                                 info="Only for the push; never stored, logged or shown again.")
                    publish_btn = gr.Button("Write the Space folder")
                    publish_md = gr.Markdown()
                    publish_file = gr.File(label="Space folder (.zip)", interactive=False, height=90)

        # ---- events: Data
        pickers = [runs_df, train_run, pg_run, runs_pick]
        convert_outputs = [report_md, files_df, dropped_df, hist, example_idx, preview_system, preview, learned, speakers,
                           to_train,
                           start_btn, session]
        convert_inputs = [files, system_prompt, redact, speakers, base_model, session]
        sample_btn.click(load_sample, outputs=files, api_name="sample").then(
            convert_data, convert_inputs, convert_outputs, api_name="convert_sample", api_visibility="private")
        files.upload(convert_data, convert_inputs, convert_outputs, api_name="convert_upload", api_visibility="private")
        check_btn.click(convert_data, convert_inputs, convert_outputs, api_name="convert")
        example_idx.change(show_example, [example_idx, session, base_model], [preview_system, preview, learned],
                          api_name="example")
        to_train.click(lambda: gr.Tabs(selected="train"), outputs=tabs, api_name="go_to_train", api_visibility="private")

        # ---- events: Train
        settings = [setting_inputs[n] for n in setting_names]
        status_outputs = [progress, loss_plot, train_log, cancel_btn, resume_btn, timer]
        preset.change(apply_preset, preset, settings, api_name="preset")
        estimate_btn.click(estimate_run, [session, base_model, preset, *settings], estimate_md, api_name="estimate")
        start_btn.click(start_training, [session, base_model, preset, *settings], train_run, api_name="train",
                        concurrency_limit=1).success(refresh_runs, outputs=pickers, api_name="runs_after_train",
                                                     api_visibility="private")
        train_run.change(run_status, train_run, status_outputs, api_name="status")
        timer.tick(run_status, train_run, status_outputs, api_name="poll", api_visibility="undocumented",
                   show_progress="hidden")
        cancel_btn.click(cancel_run, train_run, None, api_name="cancel").then(
            run_status, train_run, status_outputs, api_name="status_after_cancel", api_visibility="private")
        resume_btn.click(resume_run, train_run, None, api_name="resume").then(
            run_status, train_run, status_outputs, api_name="status_after_resume", api_visibility="private")

        # ---- events: Playground
        chat_inputs = [msg, pg_run, with_prompted, max_new, temperature, top_p, seed, rep, chats]
        chat_outputs = [msg, base_chat, tuned_chat, prompted_chat, chats]
        # Send is disabled while the replies stream, so a second click cannot interleave two turns
        for trigger, name in ((send_btn.click, "chat"), (msg.submit, "chat_submit")):
            trigger(lambda: gr.Button("Answering…", interactive=False), outputs=send_btn, api_name=f"{name}_busy",
                    api_visibility="private", queue=False).then(
                chat, chat_inputs, chat_outputs, api_name=name, concurrency_limit=CHAT_CONCURRENCY,
                concurrency_id="chat", api_visibility="public" if name == "chat" else "private").then(
                lambda: gr.Button("Send", interactive=True), outputs=send_btn, api_name=f"{name}_done",
                api_visibility="private", queue=False)
        clear_btn.click(lambda: ([], [], [], new_chats()), outputs=[base_chat, tuned_chat, prompted_chat, chats],
                        api_name="clear_chat")
        # a column's own trash icon forgets that column's conversation too
        for column, box in (("base", base_chat), ("tuned", tuned_chat), ("prompted", prompted_chat)):
            box.clear(functools.partial(forget_column, column), chats, chats, api_name=f"clear_{column}",
                      api_visibility="private")
        with_prompted.change(lambda v: gr.update(visible=bool(v)), with_prompted, prompted_chat, api_name="toggle_prompted",
                            api_visibility="private")
        # runs finish while the page is open: opening the tab picks up the newest ones
        playground_tab.select(playground_runs, pg_run, pg_run, api_name="playground_runs")
        pg_run.change(saved_evaluation, pg_run, [eval_metrics, eval_rows], api_name="saved_evaluation")
        pg_run.change(lambda: ([], [], [], new_chats()), outputs=[base_chat, tuned_chat, prompted_chat, chats],
                      api_name="new_chat", api_visibility="private")
        eval_btn.click(evaluate_run, [pg_run, eval_prompts, max_new, temperature, top_p, seed, rep],
                       [eval_metrics, eval_rows],
                       api_name="evaluate", concurrency_limit=1)

        # ---- events: Runs
        refresh_btn.click(refresh_runs, outputs=pickers, api_name="runs")
        runs_tab.select(refresh_runs, outputs=pickers, api_name="runs_on_open", api_visibility="private")
        runs_pick.change(run_details, runs_pick, details, api_name="run_details")
        dl_adapter_btn.click(download_adapter, runs_pick, download, api_name="download_adapter", concurrency_limit=1)
        dl_merged_btn.click(download_merged, runs_pick, download, api_name="download_merged", concurrency_limit=1)
        push_btn.click(push_run, [runs_pick, repo_id, token, push_merged, push_private], [push_md, token],
                       api_name="push",
                       concurrency_limit=1)
        delete_btn.click(lambda: gr.Row(visible=True), outputs=confirm_row, api_name="ask_delete",
                         api_visibility="private")
        keep_btn.click(lambda: gr.Row(visible=False), outputs=confirm_row, api_name="keep_run",
                       api_visibility="private")
        confirm_delete.click(delete_run, runs_pick, [*pickers, confirm_row], api_name="delete")
        publish_btn.click(publish_space, [runs_pick, space_title, space_merge, space_id, space_token],
                          [publish_md, publish_file, space_token], api_name="publish", concurrency_limit=1)

        demo.load(page_load, outputs=[train_run, pg_run, runs_pick, runs_df, notice], api_name="load")
    return demo


def auth_from_env() -> tuple[str, str] | None:
    """TUNER_AUTH="user:password" turns on Gradio's login page (for self-hosting)."""
    value = os.environ.get("TUNER_AUTH", "")
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("TUNER_AUTH must look like user:password")
    return user, password


def main() -> None:
    from tuner import jobs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    jobs.reconcile()  # runs left "running" by a previous process become "interrupted" (resumable)
    # sessions of a previous process are gone; their uploads must not outlive them
    shutil.rmtree(uploads_dir(), ignore_errors=True)
    build_demo().queue(max_size=limits.QUEUE_SIZE).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=limits.MAX_UPLOAD_BYTES,
        auth=auth_from_env(),
        allowed_paths=[str(SAMPLES_DIR)],  # the public sample exports; nothing else on disk is served
        run_history=False,  # security: the run history page would keep tokens and transcripts in the browser
        footer_links=["api", "gradio"],
        css=CSS,
    )


if __name__ == "__main__":
    main()
