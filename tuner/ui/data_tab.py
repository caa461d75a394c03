"""1. Data: upload exports, map speakers, read the validation report, preview what the model learns.

Every view of this tab is computed by `views(session, report)` from the session's current data:
a conversion, a failed conversion, replacing the files and clearing them all go through it, so no
view can show a previous file's numbers.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from tuner import limits, preview
from tuner.config import ConvertConfig
from tuner.errors import DataError, TunerError
from tuner.paths import uploads_dir
from tuner.progress import fmt_duration
from tuner.ui.common import Components, bubbles, friendly, keyed, md_escape, pick
from tuner.words import and_list, plural

ROOT = Path(__file__).resolve().parents[2]
SAMPLES_DIR = ROOT / "datasets"
SAMPLE_FILES = ["kettle_transcripts.txt"]  # "Try the sample": a raw chat log (datasets/README.md)
UPLOAD_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt"]  # what tuner.formats reads
# one unit a column: the file's own lines/rows/records, conversations kept, drops as listed in the dropped table
FILES_COLUMNS = ["file", "format", "in the file", "kept", "dropped", "what it is"]
DROPPED_COLUMNS = ["file", "line", "reason", "kind"]
INTRO = "Upload your exports (or try the sample) to see what tuner makes of them."
# what `views` fills; the API's output order (gradio_client callers unpack it)
VIEWS = ["report", "files_table", "dropped_table", "histogram", "example", "preview_system", "preview", "learned",
         "speakers", "to_train", "start_btn", "session"]


# -- one browser's data --------------------------------------------------------------------------


def new_session() -> dict[str, Any]:
    """What one browser session owns: its upload folder (by a random id) and its converted data."""
    return {"id": uuid.uuid4().hex, "data_dir": None, "ok": False, "speakers": [], "team": []}


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


# -- the report --------------------------------------------------------------------------------------


UNIT_WORDS = {"lines": "line", "rows": "row", "records": "record", "conversations": "conversation",
              "files": "unreadable file"}  # report["totals"]["dropped_by_unit"] keys, in the order they are told


def _dropped_parts(by_unit: dict[str, int]) -> str:
    """{"lines": 8, "conversations": 2} -> "8 lines and 2 conversations"."""
    return and_list(plural(by_unit[unit], UNIT_WORDS.get(unit, unit)) for unit in sorted(
        by_unit, key=lambda u: list(UNIT_WORDS).index(u) if u in UNIT_WORDS else len(UNIT_WORDS)) if by_unit[unit])


def counts(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the headline, the files table and the dropped table show, from the report's `totals`.

    One unit each: conversations kept; drops as listed in the dropped table (a line, row or record that
    never became a conversation, a conversation that cannot be trained on, or a whole unreadable file).
    """
    totals = report.get("totals") or {}
    return {"kept": int(totals.get("conversations_kept") or 0), "dropped": int(totals.get("dropped") or 0),
            "dropped_by_unit": dict(totals.get("dropped_by_unit") or {}),
            "listed": len(report.get("dropped") or [])}


def report_markdown(report: dict[str, Any]) -> str:
    """The validation report's headline: verdict, counts, PII, warnings (user text escaped)."""
    stats = report.get("stats") or {}
    lines = []
    if report.get("ok"):
        lines.append(f"### Ready to train: {plural(report.get('train_examples', 0), 'training example')} and "
                     f"{plural(report.get('validation_examples', 0), 'validation example')}")
    else:
        lines.append("### Not enough to train on yet")
        if report.get("reason"):
            reason = md_escape(report["reason"])
            lines.append(reason[:1].upper() + reason[1:] + ".")
    n = counts(report)
    dropped = "none dropped"
    if n["dropped"]:
        where = "each listed below" if n["listed"] >= n["dropped"] else f"the first {n['listed']:,} listed below"
        dropped = f"{n['dropped']:,} dropped ({_dropped_parts(n['dropped_by_unit'])}; {where})"
    kept = plural(n["kept"], "conversation", zero="no")
    facts = [f"**{kept[:1].upper() + kept[1:]} kept, {dropped}**"]
    tokens = stats.get("tokens") or {}
    if tokens.get("total"):
        facts.append(f"{plural(tokens['total'], 'token')} (median {tokens['median']:g} per example, "
                     f"longest {tokens['max']:,}; limit {stats.get('max_length')})")
    learned = (stats.get("assistant_tokens") or {}).get("total")
    if learned:
        facts.append(f"{learned:,} of them in replies the model learns from")
    if report.get("elapsed_s") is not None:
        facts.append(f"checked in {report['elapsed_s']:.1f} s" if report["elapsed_s"] >= 0.1 else "checked in under 0.1 s")
    lines.append(" · ".join(facts))
    estimate = stats.get("train_time_estimate") or {}
    if estimate.get("tokens_per_epoch"):
        lines.append(f"One epoch is about {plural(estimate['tokens_per_epoch'], 'token')}: "
                     f"{fmt_duration(estimate['cpu_s_per_epoch'])} on a CPU, {fmt_duration(estimate['gpu_s_per_epoch'])} "
                     "on a GPU with the default model (a rough estimate from a reference speed).")
    pii = {k: v for k, v in (report.get("pii") or {}).items() if v}
    if pii:
        found = ", ".join(f"{v} {md_escape(k)}" for k, v in pii.items())
        lines.append(f"**Personal data {'replaced with placeholders' if report.get('pii_redacted') else 'found'}:** "
                     f"{found}" + ("" if report.get("pii_redacted") else " (tick *Redact personal data* to replace it)"))
    # the page maps speakers with its own checklist: advice naming a CLI flag is for the terminal; the
    # blocked verdict and personal data have their own lines above
    warnings = [w for w in report.get("warnings") or [] if not w.startswith(("Personal data found", "Training is blocked"))
                and "--assistant" not in w and "--user" not in w]
    if warnings:
        lines.append("**Warnings**\n\n" + "\n".join(f"- {md_escape(w)}" for w in warnings))
    if report.get("unmapped_speakers"):
        lines.append("**Some speakers have no role.** Tick the ones that are your team in the list on the left, "
                     "then press *Check data* again.")
    return "\n\n".join(lines)


def files_table(report: dict[str, Any]) -> pd.DataFrame:
    """A row a file: what it holds (in its own unit), the conversations kept, the drops listed for it."""
    from tuner.dataset import dropped_by_unit
    from tuner.formats import FORMAT_HELP

    def what(f: dict[str, Any]) -> str:
        text = f.get("error") or FORMAT_HELP.get(f.get("format") or "", "")
        if f.get("dropped"):
            text += f" · dropped: {_dropped_parts(dropped_by_unit([f]))}"
        return text

    rows = [{"file": f.get("file"), "format": f.get("format") or "not recognised",
             "in the file": plural(f.get("rows_read") or 0, UNIT_WORDS[f["row_unit"]]) if f.get("row_unit") else "—",
             "kept": f.get("conversations_kept"), "dropped": f.get("dropped"), "what it is": what(f)}
            for f in report.get("files") or []]
    return pd.DataFrame(rows, columns=FILES_COLUMNS)


def dropped_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = [{"file": d.get("file"), "line": d.get("line"), "reason": d.get("reason"), "kind": d.get("category")}
            for d in report.get("dropped") or []]
    return pd.DataFrame(rows, columns=DROPPED_COLUMNS)


def histogram(data_dir: str | Path | None, base_model: str) -> gr.BarPlot:
    """The length bar plot, bins in numeric order (a nominal axis would sort '128-159' before '32-63').

    With no examples the plot is hidden, not emptied: gradio 6.31's plot rebuilds itself when its axes
    change and draws the data it had before the update, so an emptied plot kept the previous file's bars.
    Hidden, it is removed from the page and drawn afresh from the new data when it shows again.
    """
    bins = preview.length_histogram(data_dir, base_model)
    frame = pd.DataFrame({"tokens": pd.Series([b for b, _ in bins], dtype="str"),
                          "examples": pd.Series([n for _, n in bins], dtype="int64")})
    top = max((n for _, n in bins), default=0)
    # the count axis starts at 0: with one bin, a [min, max] axis would draw the only bar with no height
    return gr.BarPlot(value=frame, sort=[b for b, _ in bins] or None, y_lim=[0, max(top * 1.1, 1)],
                      visible=bool(bins))


def views(session: dict[str, Any], report: dict[str, Any] | None = None, base_model: str = "default",
          message: str | None = None) -> dict[str, Any]:
    """Every view of the Data tab, from this session's data alone (nothing kept from earlier files)."""
    data_dir = session.get("data_dir") if report is not None else None
    examples = preview.read_examples(data_dir)
    first = examples[0] if examples else []
    team = session.get("team") or []
    ok = bool(session.get("ok")) and report is not None
    return {
        "report": report_markdown(report) if report is not None else (message or INTRO),
        "files_table": files_table(report or {}),
        "dropped_table": dropped_table(report or {}),
        "histogram": histogram(data_dir, base_model),
        "example": gr.update(maximum=max(len(examples), 2), value=1, visible=len(examples) > 1),  # min < max
        "preview_system": preview.system_of(first),
        "preview": bubbles(first),
        "learned": preview.trained_tokens(first, base_model) if first else [],
        "speakers": gr.update(choices=session.get("speakers") or [],
                              value=[s for s in team if s in (session.get("speakers") or [])],
                              visible=bool(session.get("speakers"))),
        "to_train": gr.update(interactive=ok),
        "start_btn": gr.update(interactive=ok),
        "session": session,
    }


# -- handlers ----------------------------------------------------------------------------------------


@friendly
def convert_data(files: list[str] | None, system_prompt: str, redact_pii: bool, team_speakers: list[str] | None,
                 base_model: str, session: dict[str, Any], progress: gr.Progress = gr.Progress()):  # noqa: B008
    """Convert this session's uploads into examples and report what was kept, dropped and found.

    The views are emptied first, so a file that cannot be read never leaves the previous file's
    report, speakers, histogram or preview on screen.
    """
    from tuner import dataset

    session = dict(session or new_session())
    files = [f for f in (files or []) if f]
    # the speakers listed keep their ticks whatever files are added or removed; the conversion says which
    # of them the files still have (report["named_speakers"]) and which new ones need asking about
    listed = list(session.get("speakers") or [])
    team = [s for s in (team_speakers or []) if s in listed]
    others = [s for s in listed if s not in team]
    session.update(data_dir=None, ok=False, team=team)
    yield views(session, message="Checking your files…")
    paths = take_uploads(files, session)
    cfg = ConvertConfig(system_prompt=(system_prompt or "").strip(), redact_pii=bool(redact_pii),
                        assistant_names=team, user_names=others)
    out_dir = session_folder(session) / "data"
    shutil.rmtree(out_dir, ignore_errors=True)
    progress(0, desc="Loading the tokenizer…")
    report = dataset.convert(paths, out_dir, cfg, tokenizer=preview.tokenizer_for(base_model or "default"),
                             progress=lambda fraction, text: progress(fraction, desc=text), hints="page")
    present = set(report.get("unmapped_speakers") or []) | (set(listed) & set(report.get("named_speakers") or []))
    session.update(speakers=sorted(present), team=[s for s in team if s in present],
                   data_dir=str(out_dir), ok=bool(report.get("ok")))
    yield views(session, report, base_model or "default")


def convert_or_reset(files: list[str] | None, system_prompt: str, redact_pii: bool, team_speakers: list[str] | None,
                     base_model: str, session: dict[str, Any], progress: gr.Progress = gr.Progress()):  # noqa: B008
    """The file box changed: convert what is in it now, or show the empty page when it was emptied."""
    if not [f for f in (files or []) if f]:
        yield clear_data(session)
        return
    yield from convert_data(files, system_prompt, redact_pii, team_speakers, base_model, session, progress)


def clear_data(session: dict[str, Any] | None) -> dict[str, Any]:
    """No files: this session's converted data goes, and every view shows the empty page."""
    session = dict(session or new_session())
    with contextlib.suppress(TunerError):
        shutil.rmtree(session_folder(session), ignore_errors=True)
    session.update(data_dir=None, ok=False, speakers=[], team=[])
    return views(session)


@friendly
def show_example(index: float | None, session: dict[str, Any], base_model: str):
    """Preview one converted example as chat bubbles and as the tokens the model learns from."""
    examples = preview.read_examples((session or {}).get("data_dir"))
    if not examples:
        return "", [], []
    i = min(max(int(index or 1), 1), len(examples)) - 1
    return preview.system_of(examples[i]), bubbles(examples[i]), preview.trained_tokens(examples[i], base_model)


@friendly
def load_sample():
    """Put the sample exports into the file box (the next event converts them)."""
    files = sample_files()
    if not files:
        raise TunerError("No sample files are installed in datasets/.")
    return files


# -- layout and events ---------------------------------------------------------------------------------


def build() -> Components:
    """The Data tab's components, by name (call inside a gr.Tab)."""
    c: Components = {}
    help_of = {f: ConvertConfig.__dataclass_fields__[f].metadata["help"] for f in ("system_prompt", "redact_pii")}
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            c["files"] = gr.File(label="Conversation exports (JSONL, JSON, CSV, TXT)", file_count="multiple",
                                 file_types=UPLOAD_TYPES, type="filepath", elem_id="upload")
            c["sample_btn"] = gr.Button("Try the sample", elem_id="try-sample")
            c["system_prompt"] = gr.Textbox(label="Brand brief (system prompt)", lines=3, info=help_of["system_prompt"],
                                            placeholder="You are the support assistant of …")
            c["redact"] = gr.Checkbox(label="Redact personal data (PII)", info=help_of["redact_pii"])
            c["speakers"] = gr.CheckboxGroup(label="Which of these speakers are your team (the assistant)?",
                                             info="Unticked speakers are treated as customers.", visible=False,
                                             elem_id="speakers")
            c["check_btn"] = gr.Button("Check data", variant="secondary", elem_id="check-data")
        with gr.Column(scale=3, min_width=420):
            c["report"] = gr.Markdown(INTRO, elem_id="report")
            c["files_table"] = gr.Dataframe(headers=FILES_COLUMNS, label="Files: what each holds, the conversations "
                                                  "kept and the drops listed below",
                                            interactive=False, elem_id="files-table", wrap=True,
                                            column_widths=["18%", "12%", "12%", "8%", "12%", "38%"])
            c["histogram"] = gr.BarPlot(x="tokens", y="examples", label="Examples by length (tokens)", sort=None,
                                        height=220, elem_id="histogram", visible=False)
            c["dropped_table"] = gr.Dataframe(headers=DROPPED_COLUMNS, label="Dropped: the lines and conversations not kept, and why",
                                              interactive=False, max_height=520, elem_id="dropped-table", wrap=True,
                                              column_widths=["20%", "8%", "56%", "16%"])
    with gr.Row():
        with gr.Column():
            c["example"] = gr.Slider(1, 2, value=1, step=1, label="Example", visible=False, elem_id="example")
            c["preview_system"] = gr.Textbox(label="System prompt of this example (context, not learned)",
                                             interactive=False, lines=1, max_lines=4, elem_id="preview-system",
                                             placeholder="None: the chat template adds the model's default.")
            c["preview"] = gr.Chatbot(label="Preview: highlighted replies are what the model learns to write",
                                      elem_id="preview", height=360, feedback_options=None,
                                      render_markdown=False, buttons=[], autoscroll=False)
        with gr.Column():
            c["learned"] = gr.HighlightedText(label="The same example as the model reads it "
                                                    "(marked: tokens it is trained on)",
                                              color_map={"learned": "#f59e0b"}, show_legend=True, elem_id="learned")
    c["to_train"] = gr.Button("Next: train on these examples →", variant="primary", interactive=False,
                              elem_id="to-train")
    return c


def wire(c: Components) -> None:
    """The Data tab's events. Needs the page's `session`, `base_model`, `start_btn` and `tabs`."""
    inputs = pick(c, "files", "system_prompt", "redact", "speakers", "base_model", "session")
    outputs = pick(c, *VIEWS)
    c["sample_btn"].click(load_sample, outputs=c["files"], api_name="sample").then(
        keyed(convert_data, c), inputs, outputs, api_name="convert_sample", api_visibility="private")
    c["files"].upload(keyed(convert_data, c), inputs, outputs, api_name="convert_upload", api_visibility="private")
    # removing one file re-checks the rest; removing the last (or the box's ×) empties every view
    c["files"].delete(keyed(friendly(convert_or_reset), c), inputs, outputs, api_name="convert_delete",
                      api_visibility="private")
    c["files"].clear(keyed(clear_data, c), c["session"], outputs, api_name="clear_data", api_visibility="private")
    c["check_btn"].click(keyed(convert_data, c), inputs, outputs, api_name="convert")
    c["example"].change(show_example, pick(c, "example", "session", "base_model"),
                        pick(c, "preview_system", "preview", "learned"), api_name="example")
    c["to_train"].click(lambda: gr.Tabs(selected="train"), outputs=c["tabs"], api_name="go_to_train",
                        api_visibility="private")
