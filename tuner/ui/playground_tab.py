"""3. Playground: base | tuned (| prompt-only) answer side by side; the evaluation scores the voice.

A reply and an evaluation can be stopped: the Stop buttons set this session's stop flag (keyed by
Gradio's session hash, never shared between browsers), which the generation checks between tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import gradio as gr
import pandas as pd

from tuner import limits
from tuner.config import GenerationConfig
from tuner.errors import TunerError
from tuner.ui.common import Components, bubbles, friendly, keyed, pick, plain_error, playground, run_choices, run_folder

CHAT_CONCURRENCY = 4  # chats handled at once; the model itself generates one batch at a time
EVAL_PROMPTS = 10  # held-out prompts the page evaluates by default ...
EVAL_MAX_PROMPTS = 50  # ... and at most (the CLI can do more)
CHAT_VIEWS = ["msg", "base_chat", "tuned_chat", "prompted_chat", "chats"]
EVAL_COLUMNS = ["prompt", "reference", "base", "tuned"]
METRIC_COLUMNS = ["metric", "base", "tuned", "reference", "what it means"]

_stops: dict[str, threading.Event] = {}  # "<session hash>:<chat|eval>" -> set when that session pressed Stop
_stops_lock = threading.Lock()


def stop_flag(request: gr.Request | None, kind: str, fresh: bool = False) -> threading.Event:
    """This session's stop flag for `kind`; `fresh` starts a new reply or evaluation (unset)."""
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_lock:
        if fresh or key not in _stops:
            _stops[key] = threading.Event()
        return _stops[key]


def drop_flag(request: gr.Request | None, kind: str, flag: threading.Event) -> None:
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_lock:
        if _stops.get(key) is flag:
            del _stops[key]


def signal_stop(request: gr.Request | None, kind: str) -> None:
    """Stop this session's reply or evaluation, if one is under way (else nothing: the next one starts fresh)."""
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_lock:
        flag = _stops.get(key)
    if flag is not None:
        flag.set()


def generation_config(max_new_tokens: float, temperature: float, top_p: float, seed: float,
                      repetition_penalty: float) -> GenerationConfig:
    """The Sampling accordion as a GenerationConfig (validated there, server limits included)."""
    return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                            seed=int(seed), repetition_penalty=float(repetition_penalty))


# -- chat ------------------------------------------------------------------------------------------


def new_chats() -> dict[str, list[dict[str, str]]]:
    """One session's playground conversations, raw text per column (the Chatbots show them escaped)."""
    return {"base": [], "tuned": [], "prompted": []}


def chat_views(chats: dict[str, list[dict[str, str]]], msg: str = "") -> dict[str, Any]:
    return {"msg": msg, "base_chat": bubbles(chats["base"]), "tuned_chat": bubbles(chats["tuned"]),
            "prompted_chat": bubbles(chats["prompted"]), "chats": chats}


def forget_column(column: str, chats: dict[str, list[dict[str, str]]] | None) -> dict[str, list[dict[str, str]]]:
    return {**(chats or new_chats()), column: []}


@friendly
def chat(message: str, run_id: str | None, with_prompted: bool, max_new_tokens: float, temperature: float,
         top_p: float, seed: float, repetition_penalty: float, chats: dict[str, list[dict[str, str]]] | None,
         request: gr.Request = None):
    """Send one message to every column and stream the replies side by side, until done or stopped.

    Bad input is refused before anything changes; a failure while streaming is said in words, the
    unanswered turn is taken back and the message returns to the text box, so nothing needs a reload.
    """
    from tuner.playground import BASE, NOTICE_KEY, PROMPTED, TUNED

    message = (message or "").strip()
    if not message:
        raise TunerError("Type a message first.")
    run_dir = run_folder(run_id) if run_id else None
    settings = generation_config(max_new_tokens, temperature, top_p, seed, repetition_penalty)
    before = {c: list(h) for c, h in (chats or new_chats()).items()}
    stop = stop_flag(request, "chat")
    pg = playground()
    if run_dir is not None:
        pg.load_run(run_dir)
    else:
        pg.load_base()
    columns = [BASE] + ([TUNED] if run_dir else []) + ([PROMPTED] if with_prompted else [])
    chats = {c: list(h) for c, h in before.items()}
    for c in columns:
        chats[c] = chats[c] + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    yield chat_views(chats)
    # without a run, say so explicitly: None would mean "the last run loaded", maybe by another session
    no_run = {"system_prompt": "", "brand_brief": ""} if run_dir is None else {}
    noticed, got_text = False, False
    try:
        stream = pg.stream_compare({c: before[c] for c in columns}, message, columns, settings, run=run_dir, **no_run)
        for partial in stream:
            if stop.is_set():
                stream.close()  # ends the generation thread too
                if not got_text:  # stopped before the first word: take the turn back, the message returns
                    gr.Info("Stopped before the first word; your message is back in the box.")
                    yield chat_views(before, msg=message)
                    return
                gr.Info("Stopped. The reply so far is kept; send another message when you like.")
                break
            if partial.get(NOTICE_KEY) and not noticed:
                gr.Warning(partial[NOTICE_KEY])
                noticed = True
            for c in columns:
                chats[c][-1] = {"role": "assistant", "content": partial.get(c, "")}
                got_text = got_text or bool(partial.get(c))
            yield chat_views(chats)
    except Exception as exc:
        gr.Warning(f"No reply: {plain_error(exc).message}")
        if not got_text:  # take the turn back: the next message starts from a clean conversation
            yield chat_views(before, msg=message)
            return
    finally:
        drop_flag(request, "chat", stop)
    yield chat_views(chats)


def arm_stop(request: gr.Request = None) -> dict[str, Any]:
    """Send pressed: a fresh stop flag for this reply, and Stop in place of Send."""
    stop_flag(request, "chat", fresh=True)
    return {"send_btn": gr.update(visible=False), "stop_btn": gr.update(visible=True)}


def press_stop(request: gr.Request = None) -> dict[str, Any]:
    """Stop: the reply ends at its next token, and Send comes back even if the reply's own event was lost
    (a dropped connection never leaves the page stuck on Stop)."""
    signal_stop(request, "chat")
    return reply_done()


def reply_done() -> dict[str, Any]:
    return {"send_btn": gr.update(visible=True, interactive=True), "stop_btn": gr.update(visible=False)}


def clear_chats(request: gr.Request = None) -> dict[str, Any]:
    """Clear: stop a reply that is streaming, then empty every column."""
    signal_stop(request, "chat")
    return {**chat_views(new_chats()), **reply_done()}


# -- evaluation ------------------------------------------------------------------------------------


def eval_tables(result: dict[str, Any]) -> dict[str, pd.DataFrame]:
    from tuner.evaluate import METRIC_LABELS

    def cell(v: Any) -> Any:
        if isinstance(v, dict):
            return f"{v.get('median', '')} ({v.get('p10', '')}-{v.get('p90', '')})"
        return "—" if v is None else v

    metrics = [{"metric": METRIC_LABELS.get(name, name), "base": cell(m.get("base")), "tuned": cell(m.get("tuned")),
                "reference": cell(m.get("reference")), "what it means": m.get("explain", "")}
               for name, m in (result.get("metrics") or {}).items()]
    rows = [{k: r.get(k) for k in EVAL_COLUMNS} for r in result.get("rows") or []]
    return {"eval_metrics": pd.DataFrame(metrics, columns=METRIC_COLUMNS),
            "eval_rows": pd.DataFrame(rows, columns=EVAL_COLUMNS)}


@friendly
def evaluate_run(run_id: str | None, prompts: float, max_new_tokens: float, temperature: float, top_p: float,
                 seed: float, repetition_penalty: float, progress: gr.Progress = gr.Progress(),  # noqa: B008
                 request: gr.Request = None) -> dict[str, Any]:
    """Answer held-out prompts with base and tuned, and score the voice; progress says n of N prompts."""
    from tuner import evaluate

    run_dir = run_folder(run_id)
    if not 1 <= int(prompts or 0) <= EVAL_MAX_PROMPTS:
        raise TunerError(f"Evaluate between 1 and {EVAL_MAX_PROMPTS} prompts here; the CLI (`python -m tuner eval`) "
                         "does more.")
    settings = generation_config(max_new_tokens, temperature, top_p, seed, repetition_penalty)
    stop = stop_flag(request, "eval", fresh=True)
    progress(0, desc="Loading the model…")

    def report(done: int, total: int, text: str) -> None:
        progress((done, total), desc=text, unit="prompts")

    try:
        result = evaluate.evaluate(run_dir, settings=settings, limit=int(prompts), playground=playground(),
                                   on_progress=report, stop=stop)
    except evaluate.Stopped:
        gr.Info("Evaluation stopped; the last complete evaluation is still shown.")
        return saved_evaluation(run_id)
    finally:
        drop_flag(request, "eval", stop)
    return eval_tables(result)


def press_eval_stop(request: gr.Request = None) -> None:
    signal_stop(request, "eval")


@friendly
def saved_evaluation(run_id: str | None) -> dict[str, Any]:
    """The last evaluation of a run (eval.json), if it has one."""
    from tuner.evaluate import saved_result

    return eval_tables(saved_result(run_folder(run_id)) if run_id else {})


@friendly
def playground_runs(current: str | None):
    """Completed runs for the playground picker, keeping the current pick while it is still there."""
    completed = run_choices(only_completed=True)
    return gr.update(choices=completed, value=current if current in completed else (completed[0] if completed else None))


# -- layout and events -----------------------------------------------------------------------------


def build() -> Components:
    """The Playground tab's components, by name (call inside a gr.Tab)."""
    # defaults from the dataclass (an instance would refuse a server limit below its default length)
    gen = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    gen["max_new_tokens"] = min(gen["max_new_tokens"], limits.MAX_NEW_TOKENS)
    gen_help = {f.name: f.metadata["help"] for f in dataclasses.fields(GenerationConfig)}
    c: Components = {}
    with gr.Row():
        c["pg_run"] = gr.Dropdown(label="Tuned run", allow_custom_value=True, scale=3, elem_id="pg-run",
                                  info="A completed run; without one only the base model answers.")
        c["with_prompted"] = gr.Checkbox(False, label="Also show prompt-only", scale=2,
                                         info="The base model told the brand brief: what prompting alone gets.")
    with gr.Row(equal_height=True):
        for name, label, elem, visible in (("base_chat", "Base model", "chat-base", True),
                                           ("tuned_chat", "Tuned", "chat-tuned", True),
                                           ("prompted_chat", "Prompt-only", "chat-prompted", False)):
            c[name] = gr.Chatbot(label=label, height=380, elem_id=elem, feedback_options=None, visible=visible,
                                 render_markdown=False, buttons=["copy_all"])
    with gr.Row():
        c["msg"] = gr.Textbox(placeholder="Ask what your customers ask… (Enter sends to every column)",
                              show_label=False, scale=5, elem_id="chat-input", max_length=4000)
        c["send_btn"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        c["stop_btn"] = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="chat-stop")
        c["clear_btn"] = gr.Button("Clear", scale=1, elem_id="chat-clear")
    with gr.Accordion("Sampling (the same for every column, so the comparison is fair)", open=False), gr.Row():
        c["max_new"] = gr.Slider(1, limits.MAX_NEW_TOKENS, value=gen["max_new_tokens"], step=1, elem_id="max-new",
                                 label="Max new tokens", info=gen_help["max_new_tokens"])
        c["temperature"] = gr.Slider(0.0, 2.0, value=gen["temperature"], step=0.05, label="Temperature",
                                     info=gen_help["temperature"])
        c["top_p"] = gr.Slider(0.05, 1.0, value=gen["top_p"], step=0.05, label="Top-p", info=gen_help["top_p"])
        c["seed"] = gr.Number(gen["seed"], precision=0, label="Seed", info=gen_help["seed"])
        c["rep"] = gr.Slider(1.0, 2.0, value=gen["repetition_penalty"], step=0.05, label="Repetition penalty",
                             info=gen_help["repetition_penalty"])
    with gr.Accordion("Evaluation: did it learn the voice, did it forget anything?", open=False, elem_id="eval-section"):
        with gr.Row():
            c["eval_prompts"] = gr.Slider(1, EVAL_MAX_PROMPTS, value=EVAL_PROMPTS, step=1, label="Held-out prompts",
                                          scale=3, elem_id="eval-prompts",
                                          info="From the run's validation split (each distinct prompt once); "
                                               "both models answer each.")
            c["eval_btn"] = gr.Button("Evaluate base vs tuned", scale=1, elem_id="eval-run")
            c["eval_stop"] = gr.Button("Stop the evaluation", variant="stop", scale=1, elem_id="eval-stop")
        c["eval_metrics"] = gr.Dataframe(label="Voice metrics", interactive=False, wrap=True, elem_id="eval-metrics",
                                         column_widths=["22%", "10%", "10%", "10%", "48%"])
        c["eval_rows"] = gr.Dataframe(label="Replies: the real one, then base and tuned, side by side",
                                      interactive=False, wrap=True, max_height=600, elem_id="eval-rows",
                                      column_widths=["22%", "26%", "26%", "26%"])
    return c


def wire(c: Components) -> None:
    """The Playground tab's events (the tab itself is `c["playground_tab"]`)."""
    inputs = pick(c, "msg", "pg_run", "with_prompted", "max_new", "temperature", "top_p", "seed", "rep", "chats")
    outputs = pick(c, *CHAT_VIEWS)
    buttons = pick(c, "send_btn", "stop_btn")
    replies = []
    # Send turns into Stop while the replies stream, so a second click cannot interleave two turns
    for trigger, name in ((c["send_btn"].click, "chat"), (c["msg"].submit, "chat_submit")):
        event = trigger(keyed(arm_stop, c), outputs=buttons, api_name=f"{name}_busy", api_visibility="private",
                        queue=False).then(
            keyed(chat, c), inputs, outputs, api_name=name, concurrency_limit=CHAT_CONCURRENCY,
            concurrency_id="chat", api_visibility="public" if name == "chat" else "private")
        replies.append(event)
        event.then(keyed(reply_done, c), outputs=buttons, api_name=f"{name}_done", api_visibility="private",
                   queue=False)
    c["stop_btn"].click(keyed(press_stop, c), outputs=buttons, api_name="stop_chat", api_visibility="private",
                        queue=False)
    c["clear_btn"].click(keyed(clear_chats, c), outputs=[*outputs, *buttons], api_name="clear_chat", cancels=replies)
    # a column's own trash icon forgets that column's conversation too
    for column in ("base", "tuned", "prompted"):
        c[f"{column}_chat"].clear(functools.partial(forget_column, column), c["chats"], c["chats"],
                                  api_name=f"clear_{column}", api_visibility="private")
    c["with_prompted"].change(lambda v: gr.update(visible=bool(v)), c["with_prompted"], c["prompted_chat"],
                              api_name="toggle_prompted", api_visibility="private")
    # runs finish while the page is open: opening the tab picks up the newest ones
    c["playground_tab"].select(playground_runs, c["pg_run"], c["pg_run"], api_name="playground_runs")
    c["pg_run"].change(keyed(saved_evaluation, c), c["pg_run"], pick(c, "eval_metrics", "eval_rows"),
                       api_name="saved_evaluation")
    c["pg_run"].change(keyed(clear_chats, c), outputs=[*outputs, *buttons], api_name="new_chat",
                       api_visibility="private")
    c["eval_btn"].click(keyed(evaluate_run, c),
                        pick(c, "pg_run", "eval_prompts", "max_new", "temperature", "top_p", "seed", "rep"),
                        pick(c, "eval_metrics", "eval_rows"), api_name="evaluate", concurrency_limit=1)
    c["eval_stop"].click(press_eval_stop, api_name="stop_evaluation", api_visibility="private", queue=False)
