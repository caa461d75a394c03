"""4. Runs: every run with its outcome and settings; download, push to the Hub, publish a Space, delete.

A Hugging Face token typed here is used for one push and never stored, logged or shown again.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from tuner.errors import TunerError
from tuner.progress import fmt_duration
from tuner.runs import Run
from tuner.ui.common import (
    Components,
    friendly,
    keyed,
    list_runs,
    md_escape,
    pick,
    plain_error,
    run_choices,
    run_folder,
)

EXPORT_TTL_S = 3600  # prepared zips are removed after an hour
RUNS_COLUMNS = ["run", "status", "base model", "preset", "steps", "train loss", "eval loss"]
PICKERS = ["runs_table", "train_run", "pg_run", "runs_pick"]  # every view that lists runs


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
    return pd.DataFrame(rows, columns=RUNS_COLUMNS)


@friendly
def run_details(run_id: str | None) -> str:
    """A run's outcome, then every setting it was trained with (its config.yaml)."""
    from tuner import jobs

    if not run_id:
        return "Pick a run."
    run_dir = run_folder(run_id)
    status = jobs.read_status(run_dir)
    cfg = Run(run_dir).config().to_dict()
    facts = {
        "status": status.get("status"),
        "steps": f"{status.get('step') or 0} / {status.get('max_steps') or '?'}",
        "examples seen": f"{status['examples_seen']:,}" if status.get("examples_seen") else None,
        "train loss": _round(status.get("train_loss")),
        "eval loss": f"{_round(status.get('first_eval_loss'))} → {_round(status.get('eval_loss'))}"
        if status.get("eval_loss") is not None else None,
        "voice (new questions)": (status.get("voice") or {}).get("sentence"),
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
def download_gguf(run_id: str | None, quant: str,
                  progress: gr.Progress = gr.Progress()) -> tuple[str, str]:  # noqa: B008 (gradio injects it)
    """The merged model as a GGUF for llama.cpp / Ollama, with its Modelfile and README, checked in llama.cpp."""
    from tuner import gguf

    reason = gguf.unavailable_reason()
    if reason:
        raise TunerError(reason)
    run_dir = run_folder(run_id)
    work = _export_dir()
    result = gguf.export_gguf(run_dir, work / f"{run_dir.name}-gguf", quant=quant,
                              progress=lambda fraction, message: progress(fraction, desc=message))
    folder = Path(result["folder"])
    check = result.get("check") or {}
    said = (f"Checked in llama.cpp on {check.get('prompts')} held-out prompts: "
            f"{check.get('identical_replies')} identical to the merged model, "
            f"{(check.get('next_token_agreement') or 0):.0%} of next tokens agree, brand phrases "
            f"{'kept' if check.get('same_brand_markers') else 'NOT kept'}.")
    if not check.get("passed"):
        said = "**The check failed** (the file is still here; see its README). " + said
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)
    return archive, said + " Then: `ollama create NAME -f Modelfile` (see the README in the zip)."


@friendly
def download_adapter(run_id: str | None) -> str:
    return download_run(run_id, merge=False)


@friendly
def download_merged(run_id: str | None) -> str:
    return download_run(run_id, merge=True)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_run(run_id: str | None, repo_id: str, token: str, merge: bool, private: bool) -> tuple[str, str]:
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
        message = re.sub(r"\s*The export is in \S+\.?$", "", str(plain_error(exc, token).message))
        raise gr.Error(_scrub(message, token), print_exception=False) from None
    url = f"https://huggingface.co/{repo_id}"
    return f"Pushed {'the merged model' if merge else 'the adapter'} to [{md_escape(repo_id)}]({url}).", ""


@friendly
def refresh_runs() -> dict[str, Any]:
    """The runs table and every run picker, from the disk."""
    choices = run_choices()
    completed = run_choices(only_completed=True)
    return {"runs_table": runs_frame(), "train_run": gr.update(choices=choices), "pg_run": gr.update(choices=completed),
            "runs_pick": gr.update(choices=choices)}


@friendly
def delete_run(run_id: str | None) -> dict[str, Any]:
    from tuner import jobs

    run_dir = run_folder(run_id)
    jobs.delete_run(run_dir.name)
    gr.Info(f"Deleted run {run_dir.name}.")
    return {**refresh_runs(), "confirm_row": gr.Row(visible=False)}


def publish_space(run_id: str | None, title: str, merge: bool, space_id: str, token: str) -> tuple[str, str, str]:
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
            folder = exc.folder
            reason = str(exc).split(". The folder")[0]
            note = f"{md_escape(_scrub(reason, token))}. Download the zip below and upload it yourself."
        zipped = publish.zip_folder(folder)
    except Exception as exc:
        raise gr.Error(_scrub(str(plain_error(exc, token).message), token), print_exception=False) from None
    size = zipped.stat().st_size / 1e6
    text = (f"Wrote the Space folder ({size:.0f} MB zipped). Unzip it and run "
            "`pip install -r requirements.txt && python app.py`, or upload it as a Space.")
    return (text + ("\n\n" + note if note else "")), str(zipped), ""


# -- layout and events ---------------------------------------------------------------------------------


def build() -> Components:
    """The Runs tab's components, by name (call inside a gr.Tab)."""
    c: Components = {}
    c["runs_table"] = gr.Dataframe(label="Runs", interactive=False, elem_id="runs-table", wrap=True)
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
    return c


def wire(c: Components) -> None:
    """The Runs tab's events (the tab itself is `c["runs_tab"]`)."""
    pickers = pick(c, *PICKERS)
    refresh = keyed(refresh_runs, c)
    c["refresh_btn"].click(refresh, outputs=pickers, api_name="runs")
    c["runs_tab"].select(refresh, outputs=pickers, api_name="runs_on_open", api_visibility="private")
    c["runs_pick"].change(run_details, c["runs_pick"], c["details"], api_name="run_details")
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
