"""2. Train: pick a preset and the few settings that matter, see the estimate, start, watch it learn.

The run's view (progress line, loss plot, log) is read from its folder on every poll: a reloaded
page or another browser sees the same run. The clock and the phase come from `tuner.progress`.
One job trains at a time: a Start while the machine is busy queues the run (tuner.jobs.submit), and
every page shows the machine's queue and moves it on (tuner.jobs.dispatch) on its timer.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import gradio as gr

from tuner import progress
from tuner.config import DEFAULT_PRESET, PRESETS, PreferenceConfig, TrainConfig, choices
from tuner.errors import TunerError
from tuner.runs import Run, has_result
from tuner.ui.common import (
    RUN_STATES_ACTIVE,
    Components,
    audit,
    friendly,
    keyed,
    md_escape,
    pick,
    queue_name,
    run_folder,
    user_of,
)
from tuner.ui.runs_tab import PICKERS, preference_sentences, refresh_runs

POLL_SECONDS = 2.0  # how often the Train tab reads status.json / metrics.jsonl
QUEUE_POLL_SECONDS = 3.0  # how often every open page shows the machine's queue and starts its next run
QUEUE_COLUMNS = ["place", "run", "owner", "since", "time left", "starts in"]
# orange dots (each step), dark orange line (smoothed), blue (held-out): named in the legend too
LOSS_COLORS = {"train loss": "#f97316", progress.SMOOTHED: "#9a3412", "held-out loss": "#2563eb"}

# Settings the Train tab shows; the rest keep their preset/default values.
MAIN_SETTINGS = ["max_steps", "num_epochs", "learning_rate", "lora_r", "batch_size", "max_length"]
_FIRST_MORE = ["quantization", "method", "lora_alpha", "lora_dropout", "grad_accum", "eval_steps", "save_steps",
               "early_stopping_patience", "warmup_ratio", "packing", "assistant_only_loss", "precision",
               "gradient_checkpointing", "seed"]  # the API's argument order since the first page: kept first
# then every other TrainConfig field, derived: a new setting appears under "More settings" without an edit here
MORE_SETTINGS = _FIRST_MORE + [f.name for f in dataclasses.fields(TrainConfig)
                               if f.name not in (*MAIN_SETTINGS, *_FIRST_MORE, "base_model", "preset")]
SETTING_LABELS = {
    "max_steps": "Max steps (-1: from the epochs)", "num_epochs": "Epochs", "min_steps": "Min steps (the preset's floor)",
    "step_limit": "Step limit (the preset's cap)", "learning_rate": "Learning rate", "lora_r": "LoRA rank",
    "batch_size": "Batch size", "max_length": "Max length (tokens)", "quantization": "Quantization",
    "method": "Method", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout", "grad_accum": "Gradient accumulation",
    "eval_steps": "Evaluate every N steps", "save_steps": "Checkpoint every N steps",
    "early_stopping_patience": "Early stopping patience", "warmup_ratio": "Warm-up share",
    "packing": "Pack short examples", "assistant_only_loss": "Learn from replies only", "seed": "Seed",
    "precision": "Precision", "gradient_checkpointing": "Gradient checkpointing", "target_modules": "Adapted layers",
    "weight_decay": "Weight decay", "save_total_limit": "Checkpoints kept", "eval_examples": "Examples per evaluation",
    "eval_share": "Validation share", "save_every_s": "Checkpoint every N seconds",
    "voice_prompts": "Voice-check questions", "logging_steps": "Log every N steps",
}
STATUS_VIEWS = ["progress", "loss_plot", "train_log", "cancel_btn", "resume_btn", "timer", "raw_log", "run_state"]


# -- settings ----------------------------------------------------------------------------------------


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
    allowed = choices(TrainConfig, name)  # text settings with a closed set of values
    if allowed:
        return gr.Radio(list(allowed), value=value, label=label, info=help_text)
    if isinstance(default, str):
        return gr.Textbox(value=value, label=label, info=help_text)
    if isinstance(default, int):
        return gr.Number(value=value, label=label, info=help_text, precision=0)
    return gr.Number(value=value, label=label, info=help_text)


def build_train_config(base_model: str, preset: str, names: list[str], values: tuple[Any, ...]) -> TrainConfig:
    """The one place the page's settings become a TrainConfig (validated there). A setting that differs from
    the preset's is the user's, given explicitly (as a CLI flag is): epochs changed here win over the preset's
    min/max steps (tuner.config.explicit_length)."""
    settings = preset_values(preset or DEFAULT_PRESET)
    given: dict[str, Any] = {}
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
        if value != settings[name]:
            given[name] = value
    given["base_model"] = (base_model or "default").strip()
    return TrainConfig.from_preset(preset or DEFAULT_PRESET, **given)


def apply_preset(preset: str) -> list[Any]:
    values = preset_values(preset)
    return [values[n] for n in MAIN_SETTINGS + MORE_SETTINGS]


@friendly
def estimate_run(session: dict[str, Any], base_model: str, preset: str, *values: Any) -> str:
    """Time and memory the run should take, and how many examples it will see, before it starts."""
    data_dir = (session or {}).get("data_dir")
    if not data_dir or not (session or {}).get("ok"):
        return "Check your data on the **Data** tab first: the estimate needs the examples."
    from tuner import jobs

    cfg = build_train_config(base_model, preset, MAIN_SETTINGS + MORE_SETTINGS, values)
    est = jobs.estimate(cfg, data_dir)
    per_step = cfg.batch_size * cfg.grad_accum
    seen = est["steps"] * per_step
    # the steps, why (the setting that decided, so a Max steps of -1 is explained), and the passes they make
    text = (f"**Estimate:** {est['steps']} steps of {per_step} examples ({cfg.steps_reason(est['examples'])}): "
            f"the run sees **{seen:,} examples**, "
            f"{progress.passes(seen, est['examples']) if est['examples'] else 'no training examples'} "
            f"(~{est['tokens']:,} tokens)")
    if est.get("time_s") is not None:
        text += f", about **{progress.fmt_duration(est['time_s'])}**"
        parts = est.get("breakdown") or {}
        named = [(parts.get(k), w) for k, w in (("startup_s", "start-up"), ("train_s", "training steps"),
                                                ("eval_s", "evaluations"),
                                                ("checks_s", "voice checks at evaluations"), ("save_s", "saving"),
                                                ("voice_s", "then, with the adapter saved, the voice check"))]
        if any(v for v, _ in named):
            text += " (" + ", ".join(f"{w} {progress.fmt_duration(v)}" for v, w in named if v) + ")"
    if est.get("memory_mb") is not None:
        text += f" and **{est['memory_mb'] / 1024:.1f} GB** of memory"
    text += f" on this machine's {est.get('device', 'CPU')}."
    if est.get("precision"):
        text += f" Precision: {est['precision']}."
    if est.get("uncertainty"):
        text += f" {est['uncertainty']}"
    if est.get("speed"):
        basis = {"run": "measured on an earlier run here",
                 "probe": "from this CPU's precision probe; the first run measures it"}.get(
            est.get("source"), "a reference speed; the first run measures it")
        text += f" Speed: {est['speed']:,.0f} tokens/s ({basis})."
    else:
        text += " (No time estimate for a Hub model that is not downloaded yet.)"
    if est.get("reach"):  # said before the run, not only by its verdict
        text += f"\n\n**{est['reach']}**"
    return text


# -- the model picker ------------------------------------------------------------------------------------

MEMORY_SETTINGS = ["max_length", "batch_size", "lora_r", "quantization", "method", "gradient_checkpointing"]


def model_choices() -> list[str]:
    """The base-model list: the embedded default on a CPU; on a GPU also the recommended chat models that fit
    it at the default preset's length and batch (any Hub id or local folder can still be typed)."""
    from tuner import memory
    from tuner.models import gpu_memory

    gpu = gpu_memory()
    if gpu is None:
        return ["default"]
    rows = memory.recommended(TrainConfig.from_preset(DEFAULT_PRESET), gpu[1])
    return ["default"] + [r["model"] for r in rows if r["fits"]]


@friendly
def memory_line(base_model: str, preset: str, *values: Any) -> str:
    """The memory the picked model needs at these settings (a formula, docs/memory.md) beside this GPU's."""
    from tuner import memory
    from tuner.memory import DEFAULT_SHAPE
    from tuner.models import DEFAULT_MODEL_NAME, check_reachable, gpu_memory, is_default, is_hub_id

    cfg = build_train_config(base_model, preset, MAIN_SETTINGS + MORE_SETTINGS, values)
    gpu = gpu_memory()
    if gpu is None and is_default(cfg.base_model):
        return (f"No GPU here: the embedded {DEFAULT_MODEL_NAME} trains on this CPU (the estimate below gives "
                "its time and memory).")
    warning = ""
    if is_hub_id(cfg.base_model):
        try:
            check_reachable(cfg.base_model)  # offline and not downloaded: said here, before Start
        except TunerError as exc:
            warning = f" **Not here yet:** {exc}"
    shape = memory.shape_of(cfg.base_model)
    if shape is None:
        return warning.strip() or (f"Memory of {cfg.base_model}: unknown until its config.json is on this machine "
                                   "(a Hub model's comes when the run starts).")
    need = memory.plan(shape, cfg)
    text = f"Needs about **{need['total_gib']} GiB** of GPU memory ({memory.describe(need)})"
    if gpu is None:
        ratio = shape.params() / DEFAULT_SHAPE.params()
        return (text + f". No GPU here: it would train on this CPU, {ratio:.0f}x the size of the embedded "
                f"{DEFAULT_MODEL_NAME} that tuner's CPU speeds are measured with." + warning)
    name, free = gpu
    if need["total_gib"] <= free:
        return text + f": fits this {name} ({free:.1f} GiB free)." + warning
    try:
        memory.check_fits(cfg, free, name)
    except TunerError as exc:
        return f"**Will not fit.** {exc}" + warning
    return text + "." + warning


@friendly
def estimate_again(session: dict[str, Any], base_model: str, preset: str, *values: Any) -> str:
    """The estimate, redone when a setting changes or a run ends (so it never speaks of an older state of
    the machine); a setting that cannot be used is said in its place rather than in a pop-up."""
    if not (session or {}).get("ok"):
        return ""
    try:
        return estimate_run.__wrapped__(session, base_model, preset, *values)
    except TunerError as exc:
        return f"**No estimate:** {md_escape(exc)}"


# -- the run's view ------------------------------------------------------------------------------------


def progress_html(status: dict[str, Any], batch_size: int = 1, grad_accum: int = 1, queue: str = "",
                  owner_note: str = "") -> str:
    """A progress bar under one line that says what the run is doing; built from numbers only, but for `queue`
    (the run's place in the machine's queue, which then is the line) and `owner_note`, both escaped."""
    state = str(status.get("status", "unknown"))
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    pct = 100.0 * step / total if total else (100.0 if state == "completed" else 0.0)
    line = (queue + " You can close this page: the run keeps its place.") if queue else \
        progress.summary(status, batch_size, grad_accum)
    busy = ' class="busy"' if state in RUN_STATES_ACTIVE else ""
    error = f'<p class="run-error">{html.escape(str(status["error"]))}</p>' if status.get("error") else ""
    verdict = (status.get("voice") or {}).get("sentence")
    preference = isinstance(status.get("preference"), dict)
    if verdict and state == "completed" and not preference:  # the answer to "did the voice stick?", unasked
        error += f'<p class="run-verdict"><b>Voice on new questions:</b> {html.escape(verdict)}.</p>'
    if state != "completed" and has_result(status):  # saved and checked before the voice check
        error += ('<p class="run-ready">The result is saved: chat with it on the <b>Playground</b> tab'
                  + (" while the voice check finishes.</p>" if state in RUN_STATES_ACTIVE
                     else "; resume to finish the voice check.</p>"))
    method = ""
    if preference:  # a preference run says what it is and, at the end, what the feedback changed
        kind = str(status.get("method") or "dpo").upper()
        method = (f'<div class="run-method" data-method="{html.escape(kind.lower())}"><b>{html.escape(kind)}</b> '
                  f"preference tuning of {html.escape(str(status.get('parent')))} on reviewers' feedback</div>")
        if state == "completed":
            error += "".join(f'<p class="run-preference">{html.escape(s)}</p>' for s in preference_sentences(status))

    if owner_note:
        error += f'<p class="run-owner">{html.escape(owner_note)}</p>'
    return (f'<div class="run-progress" data-status="{html.escape(state)}">{method}'
            f'<div class="run-line"><span{busy}></span>{html.escape(line)}</div>'
            f'<progress max="100" value="{pct:.1f}"></progress>{error}</div>')


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def loss_svg(metrics: list[dict[str, Any]], last_step: int) -> str:
    """The train and held-out loss curves as an SVG: every measured point drawn as a dot (the first one shows
    alone), lines between points, the train loss also smoothed (a thick line through the jagged per-step
    one), each series in its own colour, named in a legend. Numbers only."""
    points = progress.loss_points(metrics)
    width, height, left, right, top, bottom = 640, 260, 52, 16, 28, 36
    if not points:
        return (f'<svg class="loss-svg" viewBox="0 0 {width} {height}" role="img" aria-label="no loss yet">'
                f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">No loss measured yet: '
                "the first point appears after the starting evaluation.</text></svg>")
    losses = [p["loss"] for p in points]
    low, high = min(losses), max(losses)
    pad = (high - low) * 0.08 or max(abs(high) * 0.05, 0.05)
    low, high = low - pad, high + pad
    x_max = max(last_step, max(p["step"] for p in points), 1)

    def x(step: float) -> float:
        return left + (width - left - right) * step / x_max

    def y(loss: float) -> float:
        return top + (height - top - bottom) * (high - loss) / (high - low)

    out = [f'<svg class="loss-svg" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="loss by step: {len(points)} points">']
    for tick in _ticks(low, high):
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
                   f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.4g}</text>')
    for tick in _ticks(0, x_max, min(x_max, 10)):
        out.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{height - bottom}"/>'
                   f'<text x="{x(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">step</text>'
               f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">loss</text>')
    lx = left + 8
    for series, color in LOSS_COLORS.items():
        mine = sorted((p for p in points if p["series"] == series), key=lambda p: p["step"])
        line_only = series == progress.SMOOTHED  # a curve through the measured dots, not a measurement
        if len(mine) > 1:
            path = " ".join(f"{'M' if k == 0 else 'L'}{x(p['step']):.1f},{y(p['loss']):.1f}" for k, p in enumerate(mine))
            look = ('stroke-width="3"' if line_only else
                    'stroke-width="1" stroke-opacity="0.5"' if series == "train loss" else 'stroke-width="2"')
            out.append(f'<path class="curve" d="{path}" stroke="{color}" fill="none" {look}/>')
        if not line_only:
            out += [f'<circle cx="{x(p["step"]):.1f}" cy="{y(p["loss"]):.1f}" r="3" fill="{color}" stroke="{color}">'
                    f'<title>{series} at step {p["step"]}: {p["loss"]:.3f}</title></circle>' for p in mine]
        if mine:  # the legend names what is drawn
            out.append(f'<rect x="{lx}" y="8" width="14" height="4" fill="{color}" stroke="{color}"/>'
                       f'<text x="{lx + 20}" y="14">{series}</text>')
            lx += 20 + 7 * len(series) + 24
    out.append("</svg>")
    return "".join(out)


def no_run_views() -> dict[str, Any]:
    return {"progress": "<p>No run yet. Check your data, then press <b>Start training</b>.</p>",
            "loss_plot": loss_svg([], 0), "train_log": "", "raw_log": "", "cancel_btn": gr.update(visible=False),
            "resume_btn": gr.update(visible=False), "timer": gr.Timer(active=False), "run_state": None}


def preference_steps(pcfg: PreferenceConfig, rows: int | None) -> int:
    """A preference run's steps before its trainer says them: max_steps, else passes x batches of the rows left
    after the held-out split (as the Trainer counts them); 0 when unknown."""
    from tuner import feedback

    if pcfg.max_steps > 0 or not rows:
        return max(pcfg.max_steps, 0)
    train, _held = feedback.split(list(range(int(rows))), pcfg.held_out if pcfg.method == "dpo" else 0.0, pcfg.seed)
    return pcfg.planned_steps(len(train))


def viewer(request: gr.Request | None) -> tuple[str, Callable[[str], bool]]:
    """Who looks at the page (tuner.auth: the signed-in name, or the machine's user on a server without sign-in)
    and `visible(owner)`: whether they may see that owner's name (tuner.auth.sees: the same person, a shared
    team, an admin, or no sign-in), else the queue says "another team"."""
    from tuner import auth

    return queue_name(request), functools.partial(auth.sees, user_of(request))


@friendly
def run_status(run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    """Everything the Train tab shows about one run, read from its folder: a waiting run says its place in the
    queue; a job the viewer may not cancel has no Cancel button, and says whose it is."""
    from tuner import jobs

    if not run_id:
        return no_run_views()
    run_dir = run_folder(run_id, request)
    status = jobs.read_status(run_dir)
    metrics = jobs.read_metrics(run_dir)
    try:
        cfg = Run(run_dir).config()
        batch, accum, max_steps = cfg.batch_size, cfg.grad_accum, cfg.max_steps
        if isinstance(status.get("preference"), dict):  # the child's own steps and batch, not its parent's
            pcfg = PreferenceConfig.from_dict(status["preference"])
            batch, accum, max_steps = pcfg.batch_size, 1, preference_steps(pcfg, status.get("preference_rows"))
        if not status.get("max_steps") and max_steps > 0:  # before the trainer has said it
            status = {**status, "max_steps": max_steps}
    except (TunerError, OSError, ValueError):
        batch, accum = 1, 1
    state = status.get("status")
    active = state in RUN_STATES_ACTIVE
    last_step = max([int(status.get("max_steps") or 0)] + [int(m["step"]) for m in metrics])
    user, visible = viewer(request)
    owner = str(status.get("owner") or "")
    mine = jobs.may_cancel(owner, user)
    note = "" if mine or not active else (f"Started by {owner if visible(owner) else 'another team'}: only they "
                                          "can cancel it.")
    queue = jobs.queue_sentence(run_dir, visible) if state == "queued" else ""
    return {
        "progress": progress_html(status, batch, accum, queue=queue, owner_note=note),
        "loss_plot": loss_svg(metrics, last_step),
        "train_log": "\n".join(preference_sentences(status) + progress.sentences(status, metrics)),
        "raw_log": progress.log_tail(Run(run_dir).log_file),
        "cancel_btn": gr.update(visible=active and mine),
        "resume_btn": gr.update(visible=state in ("interrupted", "cancelled", "failed")),
        "timer": gr.Timer(active=active),
        "run_state": f"{run_dir.name}:{state}",  # a change (a run ended) redoes the estimate: it learned from it
    }


@friendly
def start_training(request: gr.Request, session: dict[str, Any], base_model: str, preset: str, *values: Any) -> str:
    """Prepare a run folder from this session's examples, owned by the user, and submit it: it trains now in a
    subprocess if the machine is free, else it waits in the machine's queue, and the run's view says its place
    (no pop-up)."""
    from tuner import auth, jobs, runs

    user = user_of(request)
    if not auth.allowed(user, "train"):
        raise TunerError(auth.refusal(user, "train"))
    if not (session or {}).get("ok") or not session.get("data_dir"):
        raise TunerError("There is nothing valid to train on yet: check your data on the Data tab first.")
    cfg = build_train_config(base_model, preset, MAIN_SETTINGS + MORE_SETTINGS, values)
    run_dir = jobs.start_new(lambda: runs.prepare_run(cfg, session["data_dir"], owner=user.owner_record()),
                             owner=queue_name(request))
    audit(request, "train", run_dir, f"{cfg.preset or 'custom'} preset, {cfg.base_model}")
    return run_dir.name


@friendly
def cancel_run(run_id: str | None, request: gr.Request = None) -> str:
    """Cancel the viewer's own job: a waiting one leaves the queue, a running one stops; another's is refused."""
    from tuner import jobs

    run_dir = run_folder(run_id, request, "train")
    user, visible = viewer(request)
    jobs.cancel(run_dir, user=user, visible=visible)
    audit(request, "cancel", run_dir)
    return run_dir.name


@friendly
def resume_run(run_id: str | None, request: gr.Request = None) -> str:
    """Continue a stopped run from its last checkpoint: now if the machine is free, else it waits in line."""
    from tuner import jobs

    run_dir = run_folder(run_id, request, "train")
    user, _visible = viewer(request)
    jobs.submit(run_dir, owner=user, resume=True)  # the run keeps its owner, if it has one
    audit(request, "resume", run_dir)
    return run_dir.name


def _since(stamp: float | None) -> str:
    """When a job started or a run was queued, as the server's clock reads it (14:05)."""
    return time.strftime("%H:%M", time.localtime(stamp)) if isinstance(stamp, (int, float)) else "—"


def queue_frame(rows: list[dict[str, Any]]):
    """The machine's queue as a table: place, run, owner (or "another team"), since, time left, starts in."""
    import pandas as pd

    from tuner.jobqueue import ordinal

    def about(seconds: float | None) -> str:
        return "unknown" if seconds is None else f"about {progress.fmt_duration(seconds)}"

    table = [{"place": "training" if r["position"] == 0 else ordinal(r["position"]), "run": r["run"] or "—",
              "owner": r["owner"] or "—", "since": _since(r["since"]),
              "time left": about(r["time_left_s"]),
              "starts in": "now" if r["position"] == 0 else about(r["starts_in_s"])} for r in rows]
    return pd.DataFrame(table, columns=QUEUE_COLUMNS)


def queue_words(rows: list[dict[str, Any]]) -> str:
    """The machine in one sentence: free, or who trains and how many wait."""
    from tuner import jobs

    training = [r for r in rows if r["position"] == 0]
    waiting = len(rows) - len(training)
    if not rows:
        return "**The machine is free:** a run started now trains at once."
    text = f"**Training now:** {md_escape(jobs.whose(training[0]))}." if training else "**The machine is free.**"
    if waiting:
        text += (f" {waiting} run{'s wait' if waiting > 1 else ' waits'} in line; each starts by itself when the one "
                 "before it ends. One job trains at a time.")
    return text


@friendly
def queue_view(request: gr.Request = None) -> dict[str, Any]:
    """The machine's queue for this viewer; first, if the machine is free, the next queued run starts (every open
    page's timer does this, so a run whose job died still gets its turn)."""
    from tuner import jobs

    jobs.dispatch()
    _user, visible = viewer(request)
    now = time.time()
    rows = jobs.queue_rows(visible, now)
    return {"queue_words": queue_words(rows), "queue_table": gr.update(value=queue_frame(rows),
                                                                       visible=bool(rows))}


# -- layout and events ---------------------------------------------------------------------------------


def build() -> Components:
    """The Train tab's components, by name (call inside a gr.Tab)."""
    defaults = preset_values(DEFAULT_PRESET)
    c: Components = {}
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            c["base_model"] = gr.Dropdown(model_choices(), value="default", allow_custom_value=True, label="Base model",
                                          info="'default' is the embedded SmolLM2-135M-Instruct; on a GPU, chat models "
                                               "that fit it; or type a Hub id like org/name or a local folder "
                                               "(safetensors only, no remote code).", elem_id="base-model")
            c["model_memory"] = gr.Markdown(memory_line("default", DEFAULT_PRESET,
                                                        *[defaults[n] for n in MAIN_SETTINGS + MORE_SETTINGS]),
                                            elem_id="model-memory")
            c["preset"] = gr.Radio(list(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                   info="quick: a first look in about a minute; standard: learns your agents' "
                                        "habits (a few minutes on a laptop CPU); balanced and thorough: more "
                                        "epochs, for a GPU and big data.")
            with gr.Group():
                for name in MAIN_SETTINGS:
                    c[f"setting:{name}"] = setting_component(name, defaults[name])
            with gr.Accordion("More settings", open=False):
                for name in MORE_SETTINGS:
                    c[f"setting:{name}"] = setting_component(name, defaults[name])
            c["estimate"] = gr.Markdown(elem_id="estimate")
            c["estimate_btn"] = gr.Button("Estimate time and memory")
            c["start_btn"] = gr.Button("Start training", variant="primary", interactive=False, elem_id="start-training")
        with gr.Column(scale=3, min_width=420):
            c["queue_words"] = gr.Markdown(elem_id="queue")
            c["queue_table"] = gr.Dataframe(queue_frame([]), label="The machine's queue (one job trains at a time)",
                                            interactive=False, visible=False, elem_id="queue-table", wrap=True,
                                            column_widths=["11%", "31%", "14%", "10%", "17%", "17%"])
            c["train_run"] = gr.Dropdown(label="Run", allow_custom_value=True, elem_id="train-run",
                                         info="Training runs in the background: closing this tab does not stop it.")
            c["progress"] = gr.HTML(elem_id="progress")
            # an SVG, not gr.LinePlot: its line-only marks leave a series' first point invisible
            c["loss_plot"] = gr.HTML(loss_svg([], 0), label="Loss (orange: train, each step and smoothed; blue: "
                                                           "held-out examples)",
                                     show_label=True, elem_id="loss-plot")
            with gr.Row():
                c["cancel_btn"] = gr.Button("Cancel training", variant="stop", visible=False, elem_id="cancel")
                c["resume_btn"] = gr.Button("Resume from the last checkpoint", visible=False, elem_id="resume")
            c["train_log"] = gr.Textbox(label="What happened (newest first)", lines=6, max_lines=12,
                                        interactive=False, autoscroll=False, elem_id="train-log")
            with gr.Accordion("Raw log (train.log)", open=False):
                c["raw_log"] = gr.Textbox(show_label=False, lines=10, max_lines=progress.LOG_LINES,
                                          interactive=False, autoscroll=False, elem_id="raw-log")
    c["timer"] = gr.Timer(POLL_SECONDS, active=False)
    c["queue_timer"] = gr.Timer(QUEUE_POLL_SECONDS)
    c["run_state"] = gr.State(None)  # "<run id>:<status>" of the run shown
    return c


def settings(c: Components) -> list[Any]:
    """The setting widgets in MAIN_SETTINGS + MORE_SETTINGS order (the API's argument order)."""
    return [c[f"setting:{n}"] for n in MAIN_SETTINGS + MORE_SETTINGS]


def wire(c: Components) -> None:
    """The Train tab's events; a started run appears in every run picker at once."""
    status = keyed(run_status, c)
    outputs = pick(c, *STATUS_VIEWS)
    run_inputs = [c["session"], c["base_model"], c["preset"], *settings(c)]
    c["estimate_btn"].click(estimate_run, run_inputs, c["estimate"], api_name="estimate")
    gr.on([c["base_model"].change] + [c[f"setting:{n}"].change for n in MEMORY_SETTINGS], memory_line,
          run_inputs[1:], c["model_memory"], api_name="model_memory", show_progress="hidden")
    # the estimate follows what it depends on: the settings, the data, the model, and runs that end here
    again = {"fn": estimate_again, "inputs": run_inputs, "outputs": c["estimate"], "show_progress": "hidden",
             "api_visibility": "private"}
    c["preset"].change(apply_preset, c["preset"], settings(c), api_name="preset").then(
        api_name="estimate_on_preset", **again)
    for name in MAIN_SETTINGS + MORE_SETTINGS:
        c[f"setting:{name}"].input(api_name=f"estimate_on_{name}", trigger_mode="always_last", **again)
    for name in ("session", "base_model", "run_state"):
        c[name].change(api_name=f"estimate_on_{name}", **again)
    queue = keyed(queue_view, c)
    started = c["start_btn"].click(start_training, run_inputs, c["train_run"], api_name="train", concurrency_limit=1)
    started.success(keyed(refresh_runs, c), c["runs_pick"], pick(c, *PICKERS), api_name="runs_after_train",
                    api_visibility="private")
    started.success(queue, None, pick(c, "queue_words", "queue_table"), api_name="queue_after_train",
                    api_visibility="private", show_progress="hidden")
    c["queue_timer"].tick(queue, None, pick(c, "queue_words", "queue_table"), api_name="queue",
                          show_progress="hidden")
    c["train_run"].change(status, c["train_run"], outputs, api_name="status")
    c["timer"].tick(status, c["train_run"], outputs, api_name="poll", api_visibility="undocumented",
                    show_progress="hidden")
    for name in ("cancel", "resume"):
        done = c[f"{name}_btn"].click(cancel_run if name == "cancel" else resume_run, c["train_run"], None,
                                      api_name=name)
        done.then(status, c["train_run"], outputs, api_name=f"status_after_{name}", api_visibility="private")
        done.then(queue, None, pick(c, "queue_words", "queue_table"), api_name=f"queue_after_{name}",
                  api_visibility="private", show_progress="hidden")

