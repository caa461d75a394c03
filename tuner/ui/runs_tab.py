"""4. Runs: every run with its outcome, settings and lineage; teach it with reviewers' feedback (report, pairs
download/import, preference tuning as a child run); download, push to the Hub, publish a Space, delete.

A Hugging Face token typed here is used for one push and never stored, logged or shown again.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from tuner import auth, edits, feedback
from tuner.config import PreferenceConfig, choices
from tuner.errors import RunNotFound, TunerError
from tuner.jobqueue import ordinal
from tuner.paths import check_run_id
from tuner.progress import epochs_run, fmt_duration, took
from tuner.runs import Run, read_json_object
from tuner.ui.common import (
    RATE_COLUMNS,
    RATE_WIDTHS,
    Components,
    active_run,
    audit,
    friendly,
    keyed,
    list_runs,
    md_escape,
    pick,
    plain_error,
    queue_name,
    run_folder,
    user_of,
    win_rates_frame,
)

EXPORT_TTL_S = 3600  # prepared zips are removed after an hour
RUNS_COLUMNS = ["run", "status", "came from", "base model", "preset", "steps", "train loss", "eval loss"]
PICKERS = ["runs_table", "train_run", "pg_run", "runs_pick", "audit_table"]  # every view that lists runs
AUDIT_COLUMNS = ["when", "who", "did", "run", "detail"]
# preference settings on the page, in the API's order: the two that matter first, then every other field (derived)
PREF_MAIN = ["beta", "num_epochs"]
PREF_SETTINGS = PREF_MAIN + [f.name for f in dataclasses.fields(PreferenceConfig) if f.name not in (*PREF_MAIN, "method")]
PREF_LABELS = {"beta": "Beta (how far from the parent)", "num_epochs": "Passes over the pairs",
               "sft_weight": "Weight of the chosen replies' fine-tuning loss", "learning_rate": "Learning rate",
               "max_steps": "Max steps (-1: use the passes)", "batch_size": "Pairs per step",
               "max_length": "Max length (tokens)", "held_out": "Held-out share", "seed": "Seed",
               "warmup_ratio": "Warm-up share", "save_every_s": "Checkpoint every N seconds",
               "loss": "Preference loss", "edit_weight": "Weight of the edited tokens' fine-tuning loss",
               "anchor_weight": "Weight holding the words the reviewer kept at the parent's distribution", "min_steps": "Min steps (a small set of pairs is repeated)"}
COUNT_COLUMNS = ["judgement", "count"]
LOST_COLUMNS = ["prompt", "vote", "preferred", "reviewer", "when"]
FEEDBACK_VIEWS = ["fb_report", "fb_counts", "fb_wins", "fb_lost", "fb_need", "fb_train_btn"]
COUNT_LABELS = {"thumbs_up": "thumbs up", "thumbs_down": "thumbs down", "edits": "edited replies",
                "votes": "blind A/B votes", "both_bad": "... of which \"both bad\"", "imported": "imported pairs"}


def _round(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, float) else value


# -- lineage and preference results ---------------------------------------------------------------------


def _data_label(source: Any) -> str:
    """Where a run's training data came from, in a few words (a converted folder's name, or an upload)."""
    path = Path(str(source))
    if path.name == "train.jsonl":
        path = path.parent
    if "uploads" in path.parts:
        return "uploaded data"
    return path.name or "data"


def method_label(status: dict[str, Any], cfg: dict[str, Any] | None = None) -> str:
    """"DPO run", "KTO run" or "SFT run" (a full fine-tune says so)."""
    if isinstance(status.get("preference"), dict):
        return f"{str(status.get('method') or status['preference'].get('method') or 'dpo').upper()} run"
    return "SFT run (full fine-tune)" if (cfg or {}).get("method") == "full" else "SFT run"


def lineage(run: Run) -> list[tuple[str, str]]:
    """What a run came from, oldest first: [("data", label), ("SFT run", id), ("DPO run", id), ...]."""
    status = run.status()
    chain = [str(x) for x in status.get("lineage") or []]
    if not chain:  # an SFT run: its data, then itself
        chain = [str((run.sources().get("train.jsonl") or {}).get("source", "data")), run.id]
    out = [("data", _data_label(chain[0]))]
    for run_id in chain[1:]:
        try:  # a copied or edited status.json must not send the page outside the runs folder
            other = run if run_id == run.id else Run(run.path.parent / check_run_id(run_id))
        except RunNotFound:
            out.append(("run (not a valid id)", run_id.replace("`", "'")))
            continue
        known = other.exists()
        out.append((method_label(other.status(), other.config_values()) if known else "run (deleted)", run_id))
    return out


def children(run: Run, user: auth.User | None = None) -> list[tuple[str, str]]:
    """The runs trained from this one (preference runs naming it as their parent) that `user` sees, as
    (kind, id)."""
    from tuner.runs import all_runs

    found = []
    for other in all_runs():
        if user is not None and not auth.sees_run(user, other.owner()):
            continue
        status = other.status()
        if status.get("parent") == run.id and other.id != run.id:
            found.append((method_label(status), other.id))
    return sorted(found, key=lambda kv: kv[1])


def _pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, (int, float)) else "n/a"


def preference_sentences(status: dict[str, Any]) -> list[str]:
    """A preference run's results in sentences with numbers (empty for other runs or before they finish)."""
    pm = status.get("preference_metrics")
    if not isinstance(status.get("preference"), dict) or not isinstance(pm, dict):
        return []
    method = str(status.get("method") or "dpo").upper()
    # what the run changed in new replies leads; how it ranks held-out pairs follows
    out = [status["behaviour"]["sentence"]] if (status.get("behaviour") or {}).get("sentence") else []
    if pm.get("held_out_pairs"):
        out.append(feedback.pairs_sentence(pm, status.get("parent"), method))
    else:  # KTO learns from thumbs: there are no pairs to hold out and score
        out.append(f"No held-out pairs to score: {method} learned from single replies marked good or bad, not pairs.")
    if status.get("train_rows") is not None:
        kind = "pairs" if method == "DPO" or pm.get("held_out_pairs") else "judged replies"  # KTO: pairs or thumbs
        out.append(f"Trained on {status['train_rows']} {kind} of {status.get('preference_rows', '?')} "
                   f"(beta {(status.get('preference') or {}).get('beta')}), {status.get('step')} steps.")
    if (status.get("edit_settings") or {}).get("sentence"):  # settings measured for the pairs' edit (tuner.config.EDIT_SETTINGS)
        out.append(status["edit_settings"]["sentence"])
    child, parent = (status.get("voice") or {}).get("sentence"), (status.get("voice_parent") or {}).get("sentence")
    if child and (child == parent or child[:1].isupper()):  # no habit to check, or no new question: said once
        out.append(f"Voice check on new questions: {child}")
    elif child or parent:
        out.append(f"Voice check on new questions: the parent {(parent or 'was not checked').rstrip('.')}; "
                   f"this run {(child or 'was not checked').rstrip('.')}.")
    return out


def runs_frame(request: gr.Request | None = None, runs: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """The runs the user sees (`runs`, else read now), one row each."""
    rows = []
    for r in list_runs(request) if runs is None else runs:
        chain = lineage(Run(Path(r["path"])))
        # data → SFT run → this run's kind: "signoff-data → signoff-run (SFT) → DPO"
        came_from = " → ".join([*(v if k == "data" else f"{v} ({k.split(' run')[0]})" for k, v in chain[:-1]),
                                chain[-1][0].split(" run")[0]])
        state = r.get("status")
        if r.get("queue_position"):  # waiting for the machine: its place in the queue (tuner.jobs.submit)
            state = f"queued ({ordinal(r['queue_position'])} in line)"
        rows.append({"run": r.get("id"), "status": state, "came from": came_from,
                     "base model": r.get("base_model"),
                     "preset": r.get("preset"), "steps": f"{r.get('step') or 0}/{r.get('max_steps') or '?'}",
                     "train loss": _round(r.get("train_loss")),
                     "eval loss": f"{_round(r.get('first_eval_loss'))} → {_round(r.get('eval_loss'))}"
                     if r.get("eval_loss") is not None else None})
    return pd.DataFrame(rows, columns=RUNS_COLUMNS)


def memorised_sentence(run: Run) -> str | None:
    """What the run's last evaluation found it memorised (copied spans, personal data, canaries), if evaluated."""
    from tuner.evaluate import saved_result
    from tuner.memorisation import METRIC

    return ((saved_result(run.path).get("metrics") or {}).get(METRIC) or {}).get("sentence")


@friendly
def run_details(run_id: str | None, request: gr.Request = None) -> str:
    """A run's outcome, then every setting it was trained with (its config.yaml)."""
    from tuner import jobs

    if not run_id:
        return "Pick a run."
    run_dir = run_folder(run_id, request)
    status = jobs.read_status(run_dir)
    run = Run(run_dir)
    cfg = run.config().to_dict()
    facts = {
        "kind": method_label(status, cfg),
        "status": status.get("status"),
        "steps": f"{status.get('step') or 0} / {status.get('max_steps') or '?'}",
        "length": epochs_run(status) if status.get("train_examples") else None,  # the epochs really run
        "examples seen": f"{status['examples_seen']:,}" if status.get("examples_seen") else None,
        "train loss": _round(status.get("train_loss")),
        "eval loss": f"{_round(status.get('first_eval_loss'))} → {_round(status.get('eval_loss'))}"
        if status.get("eval_loss") is not None else None,
        "voice (new questions)": (status.get("voice") or {}).get("sentence"),
        "prompt, retrieve or tune (last evaluation)": ((read_json_object(run.eval_file).get("three_way") or {})
                                                       .get("sentence")),
        "memorised (last evaluation)": memorised_sentence(run),
        "tokens trained": f"{status['tokens_trained']:,}" if status.get("tokens_trained") else None,
        "time": fmt_duration(took(status)) if took(status) else None,
        "peak memory": f"{status['peak_memory_mb'] / 1024:.1f} GB" if status.get("peak_memory_mb") else None,
        "error": status.get("error"),
        "owner": (run.owner() or {}).get("name") or "nobody (made before owners were recorded)",
    }
    lines = [f"#### {md_escape(run_dir.name)}", ""]
    # inside a code span markdown shows backslashes as they are: no escaping there, only no backtick
    chain = " → ".join(f"{kind} `{name.replace('`', chr(39))}`" for kind, name in lineage(run))
    lines.append(f"**Lineage:** {chain}")
    kids = children(run, user_of(request))
    if kids:
        lines.append(f"**Trained from it:** {', '.join(f'{k} `{v}`' for k, v in kids)}")  # ids: check_run_id-safe
    said = preference_sentences(status)
    if said:
        lines += ["", "**What the feedback changed:** " + md_escape(" ".join(said))]
    lines += ["", "| result | |", "|---|---|"]
    lines += [f"| {k} | {md_escape(v)} |" for k, v in facts.items() if v is not None]
    if isinstance(status.get("preference"), dict):
        lines += ["", "| preference setting | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {md_escape(v)} |" for k, v in status["preference"].items()]
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


# -- teach it with feedback ------------------------------------------------------------------------------


def training_plan(report: dict[str, Any]) -> tuple[str | None, str]:
    """Which preference method the feedback allows ("dpo" on pairs, "kto" on thumbs only, None: too little),
    and the sentence that says so (with the number still needed)."""
    pairs, thumbs = report["pairs"], report["unpaired"]
    if pairs >= feedback.MIN_PAIRS:
        unused = f" The {thumbs} thumbs are not used by DPO." if thumbs else ""
        return "dpo", f"{pairs} preference pairs: ready to train with DPO, as a child run of this one.{unused}"
    if thumbs >= feedback.MIN_PAIRS:
        few = (f" The {pairs} pair{' is' if pairs == 1 else 's are'} not used: DPO needs at least {feedback.MIN_PAIRS} "
               f"({feedback.MIN_PAIRS - pairs} more).") if pairs else ""
        return "kto", (f"{thumbs} thumbs up/down: ready to train with KTO, which learns from single replies marked "
                       f"good or bad.{few}")
    need = feedback.pairs_needed(pairs) or ""
    if thumbs:
        need += (f" Or {feedback.MIN_PAIRS - thumbs} more thumbs up/down for KTO "
                 f"({thumbs} of {feedback.MIN_PAIRS} so far).")
    return None, need


def _counts_frame(report: dict[str, Any]) -> pd.DataFrame:
    rows = [{"judgement": label, "count": report["counts"][key]} for key, label in COUNT_LABELS.items()]
    rows.append({"judgement": "preference pairs (for DPO)", "count": report["pairs"]})
    return pd.DataFrame(rows, columns=COUNT_COLUMNS)


def source_label(source: str, run: Run) -> str:
    """Who wrote a reply, as the playground names it (tuner.feedback.source_label)."""
    return feedback.source_label(source, run.id, run.status().get("parent"))


def _lost_frame(report: dict[str, Any], run: Run) -> pd.DataFrame:
    rows = [{"prompt": lost["prompt"], "vote": lost["choice"],
             "preferred": source_label(lost["winner"], run) if lost["winner"] else "neither",
             "reviewer": lost["reviewer"] or "", "when": lost["time"]} for lost in report["lost"]]
    return pd.DataFrame(rows, columns=LOST_COLUMNS)


def _n(count: int, noun: str) -> str:
    """'1 edited reply', '3 edited replies'."""
    plural = noun[:-1] + "ies" if noun.endswith("y") and noun[-2] not in "aeiou" else noun + "s"
    return f"{count} {noun if count == 1 else plural}"


def report_words(run: Run, report: dict[str, Any]) -> str:
    """The feedback report in plain words: how many judgements, who wins the blind votes, where the bot lost."""
    counts = report["counts"]
    if not counts["judgements"]:
        return (f"No feedback on **{md_escape(run.id)}** yet. Give thumbs, edit replies or vote in blind A/B mode on "
                "the **Playground** tab, or import pairs your team already has (below).")
    thumbs = counts["thumbs_up"] + counts["thumbs_down"]
    kinds = [_n(n, noun) + extra for n, noun, extra in (
        (counts["votes"], "blind vote", f" ({counts['both_bad']} both bad)" if counts["both_bad"] else ""),
        (counts["edits"], "edited reply", ""), (thumbs, "thumb", f" ({counts['thumbs_up']} up)"),
        (counts["imported"], "imported pair", "")) if n]
    words = [f"**{_n(counts['judgements'], 'judgement')}** on **{md_escape(run.id)}**: {', '.join(kinds)}. "
             f"They make **{_n(report['pairs'], 'preference pair')}**."]
    ranked = sorted(report["win_rates"].items(), key=lambda kv: -(kv[1]["rate"] or 0))
    if ranked:
        words.append("In blind votes: " + "; ".join(
            f"**{md_escape(source_label(source, run))}** won {w['wins']} of {w['votes']} ({_pct(w['rate'])}; 95% interval "
            f"{w['low']:.0%} to {w['high']:.0%})" for source, w in ranked) + ".")
    if report["lost"]:
        words.append(f"The tuned bot lost {len(report['lost'])} vote{'s' if len(report['lost']) != 1 else ''}: "
                     "the prompts are in the table below.")
    return " ".join(words)


@friendly
def feedback_report(run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    """The Teach-it-with-feedback views of one run: words, tables, and the Train button (off with the number
    still needed when there is too little to learn from, or when the run has no finished adapter)."""
    if not run_id:
        empty = {"fb_report": "Pick a run to see its feedback.", "fb_counts": pd.DataFrame(columns=COUNT_COLUMNS),
                 "fb_wins": pd.DataFrame(columns=RATE_COLUMNS), "fb_lost": pd.DataFrame(columns=LOST_COLUMNS),
                 "fb_need": "", "fb_train_btn": gr.update(interactive=False)}
        return empty
    run = Run(run_folder(run_id, request))
    report = feedback.report(run)
    method, need = training_plan(report)
    status = run.status()
    if method and (status.get("status") != "completed" or not run.adapter_dir.is_dir()):
        method, need = None, (f"{need} But {run.id} has no finished adapter (status {status.get('status')}): "
                              "preference tuning starts from a completed LoRA run.")
    elif method and run.config_values().get("method") == "full":
        method, need = None, f"{need} But {run.id} is a full fine-tune; preference tuning trains a LoRA adapter."
    elif method == "dpo":  # the settings the run will take for these pairs' edit, before it starts
        _cfg, applied = edits.settings_for_edit(PreferenceConfig(), feedback.pairs(run))
        if applied:
            need += f" {applied['sentence']} A setting you change above keeps your value."
    label = f"Train on this feedback ({method.upper()})" if method else "Train on this feedback"
    return {"fb_report": report_words(run, report), "fb_counts": _counts_frame(report),
            "fb_wins": win_rates_frame(report["win_rates"], run.id, run.status().get("parent")), "fb_lost": _lost_frame(report, run), "fb_need": md_escape(need),
            "fb_train_btn": gr.update(interactive=method is not None, value=label)}


@friendly
def export_feedback(run_id: str | None, request: gr.Request = None) -> str:
    """The run's preference pairs as a JSONL file in trl's format ({"prompt", "chosen", "rejected"} a line)."""
    run = Run(run_folder(run_id, request, "export"))
    path = _export_dir() / f"{run.id}-preferences.jsonl"
    if not feedback.export_pairs(run, path):
        raise TunerError(f"{run.id} has no preference pairs yet: an A/B vote for A or B, or an edited reply on the "
                         "Playground tab, makes one.")
    audit(request, "export", run.path, "preference pairs")
    return str(path)


def import_words(found: feedback.PairFile, name: str, limit: int = 10) -> str:
    """What an import kept and what it left out, each bad line named with its fix."""
    kept = len(found.rows)
    words = [f"Imported **{kept} pair{'s' if kept != 1 else ''}** from {md_escape(name)}."]
    if found.errors:
        n = len(found.errors)
        words.append(f"**{n} line{'s' if n != 1 else ''} left out** (the valid lines were kept):")
        for err in found.errors[:limit]:
            where = f"line {err.line}" if err.line else "the file"
            text = str(err).split(": ", 1)[1] if err.file and str(err).startswith(err.file) else str(err)
            words.append(f"- {where}: {md_escape(text)}")
        if n > limit:
            words.append(f"- and {n - limit} more.")
    return "\n".join(words)


@friendly
def import_feedback(run_id: str | None, file: Any, request: gr.Request = None) -> dict[str, Any]:
    """Add a preference file's valid pairs to the run's feedback; every bad line is named, none of the good lost."""
    run = Run(run_folder(run_id, request, "judge"))
    path = getattr(file, "name", None) or (file.get("path") if isinstance(file, dict) else file)
    if not path:
        raise TunerError("Choose a preference file (.jsonl, one {\"prompt\", \"chosen\", \"rejected\"} a line).")
    # the pairs are signed with the name signed in (none without a login, as before)
    found = feedback.import_pairs(run, path, reviewer=user_of(request).name if auth.mode() != "none" else None)
    return {**feedback_report(run.id, request), "fb_import_md": import_words(found, Path(path).name)}


def preference_config(method: str, values: tuple[Any, ...]) -> PreferenceConfig:
    """The one place the page's preference settings become a PreferenceConfig (validated there)."""
    settings: dict[str, Any] = {"method": method}
    defaults = PreferenceConfig()
    for name, value in zip(PREF_SETTINGS, values, strict=True):
        if value is None or value == "":
            raise TunerError(f"{PREF_LABELS.get(name, name)} is empty: give it a value.")
        default = getattr(defaults, name)
        settings[name] = (str(value) if isinstance(default, str) else int(value) if isinstance(default, int)
                          else float(value))
    return PreferenceConfig.from_dict(settings)


@friendly
def train_on_feedback(run_id: str | None, request: gr.Request = None, *values: Any) -> dict[str, Any]:
    """Prepare a preference run (a child of this one) on its feedback and start it as a job; the Train tab
    then shows it, with the same live progress, cancel and resume as SFT."""
    from tuner import jobs
    from tuner.train.preference import prepare_preference_run

    run = Run(run_folder(run_id, request, "train"))
    method, need = training_plan(feedback.report(run))
    if method is None:
        raise TunerError(need)
    pcfg = preference_config(method, values)
    owner = user_of(request).owner_record()
    child = jobs.start_new(lambda: prepare_preference_run(run.path, pcfg, owner=owner), owner=queue_name(request))
    audit(request, "train", child, f"{method.upper()} on the feedback of {run.id}")
    gr.Info(f"{method.upper()} started: run {child.name}, a child of {run.id}. Its progress is on the Train tab.")
    return {"train_run": child.name, "tabs": gr.Tabs(selected="train")}


@friendly
def download_run(run_id: str | None, merge: bool = False, request: gr.Request = None) -> str:
    """Zip the run's adapter (or the model merged with it) for download."""
    from tuner import export

    run_dir = run_folder(run_id, request, "export")
    work = _export_dir()
    folder = work / (f"{run_dir.name}-merged" if merge else f"{run_dir.name}-adapter")
    folder = export.export(run_dir, folder, merge=merge)
    archive = shutil.make_archive(str(folder), "zip", root_dir=work, base_dir=folder.name)
    audit(request, "export", run_dir, "merged model (.zip)" if merge else "adapter (.zip)")
    return archive


@friendly
def download_gguf(run_id: str | None, quant: str,
                  progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio injects it)
                  request: gr.Request = None) -> tuple[str, str]:
    """The merged model as a GGUF for llama.cpp / Ollama, with its Modelfile and README, checked in llama.cpp."""
    from tuner import gguf

    run_dir = run_folder(run_id, request, "export")
    reason = gguf.unavailable_reason()
    if reason:
        raise TunerError(reason)
    work = _export_dir()
    result = gguf.export_gguf(run_dir, work / f"{run_dir.name}-gguf", quant=quant,
                              progress=lambda fraction, message: progress(fraction, desc=message))
    folder = Path(result["folder"])
    check = result["check"]
    said = "Checked in llama.cpp: " + md_escape(check["sentence"])
    if not check["passed"]:
        said = "**The check failed** (the file is still here; every reply is in its check.json). " + said
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)
    audit(request, "export", run_dir, f"GGUF {quant}")
    return archive, said + " Then: `ollama create NAME -f Modelfile` (see the README in the zip)."


@friendly
def download_adapter(run_id: str | None, request: gr.Request = None) -> str:
    return download_run(run_id, merge=False, request=request)


@friendly
def download_merged(run_id: str | None, request: gr.Request = None) -> str:
    return download_run(run_id, merge=True, request=request)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_run(run_id: str | None, repo_id: str, token: str, merge: bool, private: bool,
             request: gr.Request = None) -> tuple[str, str]:
    """Push the adapter (or merged model) to the Hub. The token is used once, never stored or shown."""
    from tuner import export

    token = (token or "").strip()
    try:
        run_dir = run_folder(run_id, request, "export")
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
        audit(request, "push", run_dir, f"{'merged model' if merge else 'adapter'} to {repo_id}")
    except Exception as exc:
        # the staging folder is gone, so its path means nothing to the user; the token never shows
        message = re.sub(r"\s*The export is in \S+\.?$", "", str(plain_error(exc, token).message))
        raise gr.Error(_scrub(message, token), print_exception=False) from None
    url = f"https://huggingface.co/{repo_id}"
    return f"Pushed {'the merged model' if merge else 'the adapter'} to [{md_escape(repo_id)}]({url}).", ""


def audit_frame(request: gr.Request | None) -> pd.DataFrame:
    """The audit log's entries for the runs the user sees (their teams'), newest first."""
    from tuner import audit as audit_log

    user = user_of(request)
    return audit_frame_of(audit_log.entries(lambda owner: auth.sees_run(user, owner)))


def audit_frame_of(entries: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"when": e.get("time"), "who": e.get("user"), "did": e.get("action"), "run": e.get("run"),
             "detail": e.get("detail", "")} for e in entries]
    return pd.DataFrame(rows, columns=AUDIT_COLUMNS)


@friendly
def refresh_runs(current: str | None = None, request: gr.Request = None) -> dict[str, Any]:
    """The runs table and every run picker, from the disk: the runs the user sees. The Runs tab keeps the run
    picked (`current`) while it is there, else picks the one training now or the newest, so it never shows no
    run beside a list."""
    runs = list_runs(request)
    choices = [r["id"] for r in runs]
    completed = [r["id"] for r in runs if r.get("has_result")]
    picked = current if current in choices else active_run(runs=runs)
    return {"runs_table": runs_frame(runs=runs), "train_run": gr.update(choices=choices),
            "pg_run": gr.update(choices=completed), "runs_pick": gr.update(choices=choices, value=picked),
            "audit_table": audit_frame(request)}


@friendly
def delete_run(run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    from tuner import jobs

    run_dir = run_folder(run_id, request, "delete")
    owner = Run(run_dir).owner()
    jobs.delete_run(run_dir.name)
    audit_log_delete(request, run_dir.name, owner)
    gr.Info(f"Deleted run {run_dir.name}.")
    return {**refresh_runs(request=request), "confirm_row": gr.Row(visible=False)}


def audit_log_delete(request: gr.Request | None, run_id: str, owner: dict[str, Any] | None) -> None:
    """A deleted run's entry, with its owner read before the folder went."""
    from tuner import audit as audit_log

    audit_log.record(user_of(request).name, "delete", run_id, owner)


def publish_space(run_id: str | None, title: str, merge: bool, space_id: str, token: str,
                  request: gr.Request = None) -> tuple[str, str, str]:
    """Write a standalone chat Space folder for the run, hand it out as a zip, and push it if asked."""
    from tuner import publish
    from tuner.dataset import pii_statement

    token, space_id = (token or "").strip(), (space_id or "").strip()
    try:
        run_dir = run_folder(run_id, request, "publish")
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
            folder, pushed = exc.folder, None
            reason = str(exc).split(". The folder")[0]
            note = f"{md_escape(_scrub(reason, token))}. Download the zip below and upload it yourself."
        zipped = publish.zip_folder(folder)
        audit(request, "publish", run_dir, f"Space folder{', pushed to ' + space_id if pushed else ''}")
    except Exception as exc:
        raise gr.Error(_scrub(str(plain_error(exc, token).message), token), print_exception=False) from None
    size = zipped.stat().st_size / 1e6
    text = (f"Wrote the Space folder ({size:.0f} MB zipped). Unzip it and run "
            "`pip install -r requirements.txt && python app.py`, or upload it as a Space.")
    # the card's own sentence about personal data, from the same report, so nobody publishes unaware
    said = "\n\nIts card says: " + md_escape(pii_statement(Run(run_dir).data_report()))
    return (text + said + ("\n\n" + note if note else "")), str(zipped), ""


# -- layout and events ---------------------------------------------------------------------------------


def pref_component(name: str) -> gr.components.Component:
    """One PreferenceConfig field as a number box, with the field's own help text."""
    f = next(f for f in dataclasses.fields(PreferenceConfig) if f.name == name)
    label, help_text = PREF_LABELS.get(name, name.replace("_", " ")), f.metadata.get("help")
    allowed = choices(PreferenceConfig, name)
    if allowed:  # a closed choice (the preference loss): a menu, not a number
        return gr.Dropdown(list(allowed), value=f.default, label=label, info=help_text)
    return gr.Number(value=f.default, label=label, info=help_text, precision=0 if isinstance(f.default, int) else None)


def pref_settings(c: Components) -> list[Any]:
    """The preference setting widgets in PREF_SETTINGS order (the API's argument order after the run)."""
    return [c[f"pref:{n}"] for n in PREF_SETTINGS]


def build() -> Components:
    """The Runs tab's components, by name (call inside a gr.Tab)."""
    c: Components = {}
    c["runs_table"] = gr.Dataframe(pd.DataFrame(columns=RUNS_COLUMNS), label="Runs", interactive=False,
                                   elem_id="runs-table", wrap=True)
    with gr.Row():
        c["runs_pick"] = gr.Dropdown(label="Run", allow_custom_value=True, scale=3, elem_id="runs-pick")
        c["refresh_btn"] = gr.Button("Refresh", scale=1)
    with gr.Row():
        with gr.Column():
            c["details"] = gr.Markdown(elem_id="run-details")
        with gr.Column():
            gr.Markdown("#### Download")
            with gr.Row():
                c["dl_adapter_btn"] = gr.Button("Adapter (.zip)")
                c["dl_merged_btn"] = gr.Button("Merged model (.zip)")
            c["download"] = gr.File(label="Download", interactive=False, height=90)
            gr.Markdown("#### For llama.cpp / Ollama / LM Studio")
            with gr.Row():
                c["gguf_quant"] = gr.Dropdown(["q8_0", "f16", "q4_k_m"], value="q8_0", label="Precision",
                                              info="q8_0: half the size of f16, same brand phrases; q4_k_m: "
                                                   "smallest, can lose the voice on the small default model.")
                c["dl_gguf_btn"] = gr.Button("GGUF + Ollama Modelfile (.zip)")
            c["gguf_md"] = gr.Markdown()
            gr.Markdown("#### Push to the Hugging Face Hub")
            c["repo_id"] = gr.Textbox(label="Model repository", placeholder="your-name/my-support-bot")
            c["token"] = gr.Textbox(label="Hugging Face token (write)", type="password",
                                    info="Used for this push only: never stored, logged or shown again.")
            with gr.Row():
                c["push_merged"] = gr.Checkbox(False, label="Merged model instead of the adapter")
                c["push_private"] = gr.Checkbox(True, label="Private repository")
            c["push_btn"] = gr.Button("Push")
            c["push_md"] = gr.Markdown()
            gr.Markdown("#### Delete")
            c["delete_btn"] = gr.Button("Delete this run…", elem_id="delete-run")
            with gr.Row(visible=False) as c["confirm_row"]:
                c["confirm_delete"] = gr.Button("Yes, delete it and all its files", variant="stop",
                                                elem_id="confirm-delete")
                c["keep_btn"] = gr.Button("Keep it")
    with gr.Column(elem_id="feedback-section", variant="panel"):
        gr.Markdown("#### Teach it with feedback\nReviewers' thumbs, edited replies and blind A/B votes on the "
                    "**Playground** tab (or pairs your team already has) train a child of this run that prefers "
                    "what they chose: DPO on pairs, KTO on thumbs only.")
        c["fb_report"] = gr.Markdown(elem_id="feedback-report")
        c["fb_counts"] = gr.Dataframe(pd.DataFrame(columns=COUNT_COLUMNS), label="Judgements by kind",
                                      interactive=False, elem_id="feedback-counts")
        # its own row, columns sized for a run's id and the interval: shown whole, never cut off at the side
        c["fb_wins"] = gr.Dataframe(pd.DataFrame(columns=RATE_COLUMNS),
                                    label="Win rate per source in blind votes (95% Wilson interval)",
                                    interactive=False, elem_id="feedback-wins", wrap=True,
                                    column_widths=RATE_WIDTHS)
        c["fb_lost"] = gr.Dataframe(pd.DataFrame(columns=LOST_COLUMNS), label="Prompts where the tuned bot lost a "
                                    "vote", interactive=False, wrap=True,
                                    elem_id="feedback-lost")
        with gr.Row(equal_height=True):
            with gr.Column():
                c["fb_export_btn"] = gr.Button("Download the pairs (.jsonl, trl preference format)",
                                               elem_id="feedback-export-btn")
                c["fb_upload"] = gr.UploadButton("Import pairs (.jsonl)", file_types=[".jsonl", ".json"],
                                                 elem_id="feedback-import-btn")
            c["fb_file"] = gr.File(label="Preference pairs", interactive=False, height=90, elem_id="feedback-file")
        c["fb_import_md"] = gr.Markdown(elem_id="feedback-import")
        with gr.Row():
            for name in PREF_MAIN:
                c[f"pref:{name}"] = pref_component(name)
        with gr.Accordion("More preference settings", open=False):
            more = PREF_SETTINGS[len(PREF_MAIN):]
            for start in range(0, len(more), 3):  # three a row keeps the section short
                with gr.Row():
                    for name in more[start:start + 3]:
                        c[f"pref:{name}"] = pref_component(name)
        c["fb_need"] = gr.Markdown(elem_id="feedback-need")
        c["fb_train_btn"] = gr.Button("Train on this feedback", variant="primary", interactive=False,
                                      elem_id="train-on-feedback")
    with gr.Column(elem_id="publish-section", variant="panel"):
        gr.Markdown("#### Publish as a Space\nA standalone chat page for this run, as a folder you "
                    "can run anywhere or upload as a Hugging Face Space.")
        with gr.Row():
            c["space_title"] = gr.Textbox(label="Title", placeholder="Kettle & Co. support", scale=3)
            c["space_merge"] = gr.Checkbox(False, label="Merge the adapter into the model", scale=1)
        with gr.Row():
            c["space_id"] = gr.Textbox(label="Push to Space (optional)", placeholder="your-name/space-name",
                                       info="Created private. Leave empty to only download the folder.")
            c["space_token"] = gr.Textbox(label="Hugging Face token (write)", type="password",
                                          info="Only for the push; never stored, logged or shown again.")
        c["publish_btn"] = gr.Button("Write the Space folder")
        c["publish_md"] = gr.Markdown()
        c["publish_file"] = gr.File(label="Space folder (.zip)", interactive=False, height=90)
    with gr.Accordion("Audit log: who trained, exported, published and deleted your team's runs", open=False,
                      elem_id="audit-section"):
        c["audit_table"] = gr.Dataframe(pd.DataFrame(columns=AUDIT_COLUMNS), interactive=False, wrap=True,
                                        elem_id="audit-table", label="Newest first (this server's audit.jsonl)")
    return c


def wire(c: Components) -> None:
    """The Runs tab's events (the tab itself is `c["runs_tab"]`)."""
    pickers = pick(c, *PICKERS)
    refresh = keyed(refresh_runs, c)
    c["refresh_btn"].click(refresh, c["runs_pick"], pickers, api_name="runs")
    c["runs_tab"].select(refresh, c["runs_pick"], pickers, api_name="runs_on_open", api_visibility="private")
    c["runs_pick"].change(run_details, c["runs_pick"], c["details"], api_name="run_details")
    # feedback: the report follows the picked run, and is read again when the tab opens (votes come from the
    # Playground tab meanwhile)
    report = keyed(feedback_report, c)
    views = pick(c, *FEEDBACK_VIEWS)
    c["runs_pick"].change(report, c["runs_pick"], views, api_name="feedback_report")
    c["runs_tab"].select(report, c["runs_pick"], views, api_name="feedback_on_open", api_visibility="private")
    c["refresh_btn"].click(report, c["runs_pick"], views, api_name="feedback_on_refresh", api_visibility="private")
    c["fb_export_btn"].click(export_feedback, c["runs_pick"], c["fb_file"], api_name="export_feedback")
    c["fb_upload"].upload(keyed(import_feedback, c), pick(c, "runs_pick", "fb_upload"), [*views, c["fb_import_md"]],
                          api_name="import_feedback")
    c["fb_train_btn"].click(keyed(train_on_feedback, c), [c["runs_pick"], *pref_settings(c)], pick(c, "train_run", "tabs"),
                            api_name="train_on_feedback", concurrency_limit=1).success(
        refresh, c["runs_pick"], pickers, api_name="runs_after_feedback_train", api_visibility="private")
    c["dl_adapter_btn"].click(download_adapter, c["runs_pick"], c["download"], api_name="download_adapter",
                              concurrency_limit=1)
    c["dl_merged_btn"].click(download_merged, c["runs_pick"], c["download"], api_name="download_merged",
                             concurrency_limit=1)
    c["dl_gguf_btn"].click(download_gguf, pick(c, "runs_pick", "gguf_quant"), pick(c, "download", "gguf_md"),
                           api_name="download_gguf", concurrency_limit=1)
    c["push_btn"].click(push_run, pick(c, "runs_pick", "repo_id", "token", "push_merged", "push_private"),
                        pick(c, "push_md", "token"), api_name="push", concurrency_limit=1)
    c["delete_btn"].click(lambda: gr.Row(visible=True), outputs=c["confirm_row"], api_name="ask_delete",
                          api_visibility="private")
    c["keep_btn"].click(lambda: gr.Row(visible=False), outputs=c["confirm_row"], api_name="keep_run",
                        api_visibility="private")
    c["confirm_delete"].click(keyed(delete_run, c), c["runs_pick"], [*pickers, c["confirm_row"]], api_name="delete")
    c["publish_btn"].click(publish_space, pick(c, "runs_pick", "space_title", "space_merge", "space_id", "space_token"),
                           pick(c, "publish_md", "publish_file", "space_token"), api_name="publish",
                           concurrency_limit=1)
