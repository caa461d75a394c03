"""The page: a header, the four tabs and the page-load event; each tab module builds and wires itself.

Gradio only. Every handler calls the `tuner` package and turns its TunerError into a plain
gr.Error. What belongs to one browser (uploads, converted examples, chats) lives in gr.State and
component values, never in module globals; a run is a folder on disk, so a reloaded page finds
its training again. Run ids from the page or the API are checked before they touch the disk.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from tuner import auth
from tuner.paths import persistent_storage
from tuner.ui import data_tab, playground_tab, runs_tab, train_tab
from tuner.ui.common import Components, active_run, friendly, keyed, list_runs, pick

CSS = """
.run-progress progress { width: 100%; height: 14px; accent-color: var(--color-accent); }
.run-progress .run-line { margin-bottom: 6px; }
.run-progress .run-line .busy { display: inline-block; width: 10px; height: 10px; margin-right: 8px;
  border-radius: 50%; background: var(--color-accent); animation: tuner-pulse 1.2s ease-in-out infinite; }
@keyframes tuner-pulse { 50% { opacity: 0.25; } }
.run-progress .run-error { color: var(--error-text-color, #b91c1c); white-space: pre-wrap; }
.loss-svg { width: 100%; height: auto; font: 11px var(--font, sans-serif); }
.loss-svg .grid { stroke: #e5e7eb; stroke-width: 1; }
.loss-svg text { fill: var(--body-text-color-subdued, #6b7280); }
.loss-svg text.empty { font-size: 13px; }
#preview .bot, #preview .message.bot { background: #fef3c7 !important; border-color: #f59e0b !important; }
"""

# gradio 6.31's frontend asks for these keys, which its own English strings lack, so the page showed the key
# itself: "common.upload" on the file box's upload button, "common.complete" read out when an event ends.
# Every other locale falls back to English for them. tests/test_app_browser.py checks every tab for raw keys.
MISSING_TRANSLATIONS = {"common.upload": "Upload", "common.complete": "Done", "common.video": "Video",
                        "common.webcam": "Webcam"}
I18N = gr.I18n(en=MISSING_TRANSLATIONS)


def storage_notice() -> str:
    """On a Space: runs are shared by its visitors (unless behind TUNER_AUTH), and without persistent
    storage they vanish on restart."""
    if not os.environ.get("SPACE_ID"):
        return ""
    notes = []
    if auth.mode() == "none":
        notes.append("**Runs on this Space are shared**: if it is public, everyone who opens it sees the run list "
                     "and can chat with, download or delete a run (uploads and chats stay in your browser). For "
                     "your company's transcripts, duplicate it as a private Space, set `TUNER_AUTH`, or add "
                     "`hf_oauth: true` to its README metadata (sign in with Hugging Face; README, *As a Hugging "
                     "Face Space*).")
    if not persistent_storage():
        notes.append("**This Space has no persistent storage**: runs are lost when it restarts or sleeps. "
                     "Download the adapter or push it to the Hub from the **Runs** tab when training ends.")
    return "\n\n".join(notes)


@friendly
def page_load(request: gr.Request = None) -> dict[str, Any]:
    """A (re)opened page shows the user's run that is training now, read from disk, not from memory; behind
    a login (TUNER_AUTH, or a Space's), the reviewer's name is the one signed in and the lists hold the runs
    of the user's teams only."""
    user = auth.current_user(request)
    notice = storage_notice()
    who = {"whoami": auth.whoami_words(user), "notice": gr.update(value=notice, visible=bool(notice))}
    if user is None:  # a Space visitor not signed in yet: no run of anyone's
        empty = gr.update(choices=[], value=None)
        return {**who, "train_run": empty, "pg_run": empty, "runs_pick": empty,
                "runs_table": runs_tab.runs_frame(runs=[]), "audit_table": runs_tab.audit_frame_of([]),
                "reviewer": ""}
    runs = list_runs(request)
    current = active_run(runs=runs)
    choices = [r["id"] for r in runs]
    completed = [r["id"] for r in runs if r.get("has_result")]
    return {**who, "train_run": gr.update(choices=choices, value=current),
            "pg_run": gr.update(choices=completed, value=completed[0] if completed else None),
            "runs_pick": gr.update(choices=choices, value=current), "runs_table": runs_tab.runs_frame(runs=runs),
            "audit_table": runs_tab.audit_frame(request),
            "reviewer": user.name if auth.mode() != "none" else getattr(request, "username", None) or ""}


def build_demo() -> gr.Blocks:
    """Lay out the four tabs, then wire every event (each with an api_name for gradio_client)."""
    c: Components = {}
    with gr.Blocks(title="tuner: fine-tune a chatbot on your support logs", delete_cache=(1800, 3600)) as demo:
        c["session"] = gr.State(data_tab.new_session, delete_callback=data_tab.end_session)
        c["chats"] = gr.State(playground_tab.new_chats)
        gr.Markdown("# tuner\nTurn your support conversations into a chatbot that answers in your voice: "
                    "**1** check the data, **2** train, **3** compare base and tuned and judge the replies, "
                    "**4** teach it with the feedback and take the model home.")
        with gr.Row(equal_height=True):
            c["whoami"] = gr.Markdown(elem_id="whoami")
            if auth.mode() == "hf":  # a Space with hf_oauth: true
                c["login"] = gr.LoginButton(scale=0)
        c["notice"] = gr.Markdown(visible=False, elem_id="storage-notice")
        with gr.Tabs() as c["tabs"]:
            with gr.Tab("1. Data", id="data"):
                c.update(data_tab.build())
            with gr.Tab("2. Train", id="train"):
                c.update(train_tab.build())
            with gr.Tab("3. Playground", id="playground") as c["playground_tab"]:
                c.update(playground_tab.build())
            with gr.Tab("4. Runs", id="runs") as c["runs_tab"]:
                c.update(runs_tab.build())
        for tab in (data_tab, train_tab, playground_tab, runs_tab):
            tab.wire(c)
        demo.load(keyed(page_load, c), outputs=pick(c, "train_run", "pg_run", "runs_pick", "runs_table", "notice",
                                                   "whoami", "audit_table", "reviewer"),
                  api_name="load")
    return demo
