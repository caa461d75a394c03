"""3. Playground: base | tuned (| prompt-only) answer side by side; the evaluation scores the voice;
reviewers' judgements (thumbs, better replies, blind A/B votes) are stored with the run (tuner.feedback).

A reply and an evaluation can be stopped: the Stop buttons set this session's stop flag (keyed by
Gradio's session hash, never shared between browsers), which the generation checks between tokens.
The feedback actions are also plain API endpoints (gradio_client): `rate_reply`, `edit_reply`,
`ab_pair` and `ab_vote`; a blind pair's hidden order lives in the session's gr.State.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from tuner import feedback, limits
from tuner.config import GenerationConfig
from tuner.errors import TunerError
from tuner.playground import message_text
from tuner.runs import Run
from tuner.ui.common import (
    RATE_COLUMNS,
    RATE_WIDTHS,
    Components,
    bubbles,
    friendly,
    keyed,
    list_runs,
    md_escape,
    pick,
    plain_error,
    playground,
    run_choices,
    run_folder,
    user_of,
    win_rates_frame,
)

CHAT_CONCURRENCY = 4  # chats handled at once; the model itself generates one batch at a time
EVAL_PROMPTS = 10  # held-out prompts the page evaluates by default ...
EVAL_MAX_PROMPTS = 50  # ... and at most (the CLI can do more)
CHAT_VIEWS = ["msg", "base_chat", "tuned_chat", "prompted_chat", "chats"]
# the evaluation's three ways (tuner.evaluate.COLUMNS), as the page names them
WAYS = {"base": "base + brand brief", "retrieved": "base + retrieved examples", "tuned": "tuned"}
EVAL_COLUMNS = ["prompt", "reference", *WAYS.values()]
METRIC_COLUMNS = ["metric", *WAYS.values(), "reference", "what it means"]
EVAL_OUTPUTS = ("eval_verdict", "eval_metrics", "eval_rows", "eval_memorised")
COLUMN_NAMES = {"base": "base", "tuned": "tuned", "prompted": "prompt-only"}  # a chat column, in words
AB_CHOICES = [("A is better", "A"), ("B is better", "B"), ("Both bad", "both bad")]
AB_ASK = "Which reply is better? Pick one below; the page says which was which after your vote."

_stops: dict[str, threading.Event] = {}  # "<session hash>:<chat|eval>" -> set when that session pressed Stop
_stops_lock = threading.Lock()
_stops_dropped = threading.Condition(_stops_lock)  # notified when a reply or evaluation has ended
STOP_WAIT_S = 5.0  # Stop waits this long for the reply to end before giving Send back anyway


def stop_flag(request: gr.Request | None, kind: str, fresh: bool = False) -> threading.Event:
    """This session's stop flag for `kind`; `fresh` starts a new reply or evaluation (unset)."""
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_lock:
        if fresh or key not in _stops:
            _stops[key] = threading.Event()
        return _stops[key]


def drop_flag(request: gr.Request | None, kind: str, flag: threading.Event) -> None:
    """The reply or evaluation that held `flag` has ended (said to anyone waiting in `signal_stop`)."""
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_dropped:
        if _stops.get(key) is flag:
            del _stops[key]
        _stops_dropped.notify_all()


def signal_stop(request: gr.Request | None, kind: str, wait_s: float = 0.0) -> bool:
    """Stop this session's reply or evaluation, if one is under way (else nothing: the next one starts fresh).
    `wait_s` > 0 waits up to that long for it to end; False when it was still running after that."""
    key = f"{getattr(request, 'session_hash', None) or 'api'}:{kind}"
    with _stops_dropped:
        flag = _stops.get(key)
        if flag is None:
            return True
        flag.set()
        return _stops_dropped.wait_for(lambda: _stops.get(key) is not flag, timeout=wait_s) if wait_s else False


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


def comparable(run_id: str, request: gr.Request | None) -> list[str]:
    """LoRA runs the user sees with a result (tuner.runs.has_result) on the picked run's base model, newest
    first: what can answer beside it. The one playground serves every session, so another base (or a second
    full model) would reload on every turn."""
    found = list_runs(request)
    base = next((r["base_model"] for r in found if r["id"] == run_id), None)
    return [r["id"] for r in found if r["id"] != run_id and r.get("has_result")
            and r.get("base_model") == base and r.get("method") != "full"]


def other_run(run_dir: Path, other: str, request: gr.Request | None) -> Path:
    """The run answering beside the picked one (left column, blind A/B), checked to be comparable."""
    other_dir = run_folder(other, request, "chat")
    if other_dir.resolve() == run_dir.resolve():
        raise TunerError("Compare the run with the base model or another run, not with itself.")
    if other_dir.name not in comparable(run_dir.name, request):
        raise TunerError(f"Run {other_dir.name} cannot answer beside {run_dir.name}: only a completed LoRA run on "
                         "the same base model can. Fix: pick one from the list, or the base model.")
    return other_dir


def left_run(run_dir: Path | None, left: str | None, request: gr.Request | None) -> Path | None:
    """The run shown in the left column instead of the base model (e.g. a preference run's parent), or None."""
    left = str(left or "base").strip()
    if run_dir is None or left == "base":
        return None
    return other_run(run_dir, left, request)


def left_label(left: str | None, run_id: str | None, request: gr.Request | None) -> str:
    if not left or left == "base" or not run_id:
        return "Base model"
    parent = parent_of(run_folder(run_id, request))
    return f"Parent run: {left}" if left == parent else f"Run: {left}"


@friendly
def chat(message: str, run_id: str | None, with_prompted: bool, max_new_tokens: float, temperature: float,
         top_p: float, seed: float, repetition_penalty: float, chats: dict[str, list[dict[str, str]]] | None,
         left: str | None = "base", request: gr.Request = None):
    """Send one message to every column and stream the replies side by side, until done or stopped.
    `left` "base" (default) or a completed run's id: what the left column shows (a run's replies come after
    the picked run's: one model pass serves one run).

    Bad input is refused before anything changes; a failure while streaming is said in words, the
    unanswered turn is taken back and the message returns to the text box, so nothing needs a reload.
    """
    from tuner.playground import BASE, NOTICE_KEY, PROMPTED, TUNED

    message = (message or "").strip()
    if not message:
        raise TunerError("Type a message first.")
    user_of(request)  # signed in, when the server asks for it (the base model too)
    run_dir = run_folder(run_id, request, "chat") if run_id else None
    left_dir = left_run(run_dir, left, request)
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
    # each pass: (run, the playground columns it generates, the chat column each one fills)
    passes = [(run_dir, [c for c in columns if not (left_dir and c == BASE)], {c: c for c in columns})]
    if left_dir is not None:
        passes.append((left_dir, [TUNED], {TUNED: BASE}))
    try:
        for pass_run, pass_columns, into in passes:
            stream = pg.stream_compare({c: before[into[c]] for c in pass_columns}, message, pass_columns, settings,
                                       run=pass_run, **no_run)
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
                for c in pass_columns:
                    chats[into[c]][-1] = {"role": "assistant", "content": partial.get(c, "")}
                    got_text = got_text or bool(partial.get(c))
                yield chat_views(chats)
            if stop.is_set():
                break
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
    """Stop: the reply ends at its next token. Send comes back once it has ended, so no word arrives after Send
    is back, and after STOP_WAIT_S even if the reply's own event was lost (a dropped connection never leaves
    the page stuck on Stop)."""
    signal_stop(request, "chat", wait_s=STOP_WAIT_S)
    return reply_done()


def reply_done() -> dict[str, Any]:
    return {"send_btn": gr.update(visible=True, interactive=True), "stop_btn": gr.update(visible=False)}


def clear_chats(request: gr.Request = None) -> dict[str, Any]:
    """Clear: stop a reply that is streaming, then empty every column."""
    signal_stop(request, "chat")
    return {**chat_views(new_chats()), **reply_done()}


@friendly
def left_changed(left: str | None, run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    """Another model in the left column: a new conversation, and the column says which model it is."""
    return {**clear_chats(request), "base_chat": gr.update(value=[], label=left_label(left, run_id, request))}


# -- feedback --------------------------------------------------------------------------------------


def feedback_run(run_id: str | None, request: gr.Request | None) -> Path:
    """The folder of the run a judgement is stored with (the picked tuned run), if the user may judge it."""
    if not run_id or not str(run_id).strip():
        raise TunerError("Pick a tuned run first: feedback is stored with the run it judges.")
    return run_folder(run_id, request, "judge")


@dataclasses.dataclass
class Judged:
    """Whose reply a judgement is about: its source name, and how the playground prompted it."""

    source: str  # "base", "prompt-only", the run's id (tuned), or another run's id (the left column)
    words: str  # the column, in the saved note
    prompt_run: Path  # the run whose system prompt the reply was sent with
    prompt_column: str  # "base", "tuned" or "prompted"


def judged(run_dir: Path, column: str, request: gr.Request | None) -> Judged:
    """A column by name ("base", "tuned", "prompted" or "prompt-only"), or a completed run's id for the left
    column when it shows another run (e.g. the parent)."""
    name = str(column or "").strip()
    key = {"prompt-only": "prompted"}.get(name.lower(), name.lower())
    if key in COLUMN_NAMES:
        return Judged(run_dir.name if key == "tuned" else COLUMN_NAMES[key], COLUMN_NAMES[key], run_dir, key)
    if name and name != run_dir.name and name in run_choices(with_result=True, request=request):
        return Judged(name, name, run_folder(name, request), "tuned")
    raise TunerError(f"Unknown column {column!r}: choose base, tuned, prompted, or the id of the completed run "
                     "shown in the left column.")


def sent_prompt(run_dir: Path, column: str, before: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation up to a reply as the playground sent it to that column: the run's training system
    prompt (the brand brief for the prompt-only column), then the turns before the reply."""
    from tuner.playground import PROMPTED, clean_history, read_run

    info = read_run(run_dir)
    system = info.brand_brief if column == PROMPTED else info.system_prompt
    return ([{"role": "system", "content": system}] if system else []) + clean_history(before)


def reply_at(history: Any, index: Any) -> tuple[list[dict[str, Any]], str]:
    """(the messages before it, the reply) for the reply at `index` of a column's chat."""
    if not isinstance(history, list) or not history:
        raise TunerError("There is no conversation to judge yet. Fix: send a message first.")
    try:
        i = int(index[0] if isinstance(index, (list, tuple)) else index)
    except (TypeError, ValueError):
        raise TunerError(f"The reply index must be a number, got {index!r}.") from None
    if not 0 <= i < len(history):
        raise TunerError(f"There is no message {i} in this chat of {len(history)} messages.")
    bad = next((n for n, m in enumerate(history) if not isinstance(m, dict) or m.get("role") not in
                ("user", "assistant", "system") or not isinstance(m.get("content"), (str, list))), None)
    if bad is not None:
        raise TunerError(f"Message {bad} of the chat is not a {{role, content}} message. Fix: send the chat as the "
                         "playground shows it (role user/assistant, content text).")
    message = history[i]
    if message["role"] != "assistant":
        raise TunerError(f"Message {i} is the customer's, not a reply. Fix: judge one of the bot's replies.")
    before = [{"role": m["role"], "content": message_text(m["content"])} for m in history[:i]]
    return before, message_text(message["content"])


def saved_note(run_dir: Path, what: str) -> str:
    n = len(feedback.records(run_dir))
    return f"Saved: {what}. {n} judgement{'s' if n != 1 else ''} on this run so far."


def signed(reviewer: str | None, request: gr.Request | None) -> str:
    """Who judged: the name signed in (TUNER_AUTH, or a Space's login) when there is one, else the name typed."""
    from tuner import auth

    if auth.mode() != "none":
        return user_of(request).name
    return getattr(request, "username", None) or str(reviewer or "").strip()


def _rate(run_id: str, column: str, history: Any, index: Any, up: bool, reviewer: str = "",
          request: gr.Request | None = None) -> str:
    run_dir = feedback_run(run_id, request)
    who = judged(run_dir, column, request)
    before, reply = reply_at(history, index)
    if not reply.strip():
        raise TunerError("This reply is empty (still being written?). Fix: wait for it, then judge it.")
    feedback.record_thumb(run_dir, sent_prompt(who.prompt_run, who.prompt_column, before), reply, bool(up),
                          who.source, reviewer)
    return saved_note(run_dir, f"thumbs {'up' if up else 'down'} on the {who.words} reply")


def _edit(run_id: str, column: str, history: Any, index: Any, new_text: str,
          reviewer: str = "", request: gr.Request | None = None) -> tuple[str, list[dict[str, str]]]:
    run_dir = feedback_run(run_id, request)
    who = judged(run_dir, column, request)
    before, reply = reply_at(history, index)
    new_text = new_text if isinstance(new_text, str) else ""
    feedback.record_edit(run_dir, sent_prompt(who.prompt_run, who.prompt_column, before), reply, new_text,
                         who.source, reviewer)
    edited = [*before, {"role": "assistant", "content": new_text},
              *({"role": m["role"], "content": message_text(m["content"])} for m in history[len(before) + 1:])]
    return saved_note(run_dir, f"your better reply in place of the {who.words} one"), edited


@friendly
def rate_reply(run_id: str, column: str, history: list[dict[str, Any]], index: int, up: bool,
               reviewer: str = "", request: gr.Request = None) -> str:
    """Thumbs up (`up` true) or down on the reply at `index` of a column's chat ([{role, content}], as
    sent); stored with the run. `column`: base, tuned, prompted, or the id of the run the left column shows.
    Returns what was saved, in words."""
    return _rate(run_id, column, history, index, up, signed(reviewer, request), request)


@friendly
def edit_reply(run_id: str, column: str, history: list[dict[str, Any]], index: int, new_text: str,
               reviewer: str = "", request: gr.Request = None) -> tuple[str, list[dict[str, Any]]]:
    """"Write the better reply": `new_text` replaces the reply at `index` (chosen; the model's is rejected).
    Returns what was saved, and the chat with the edit in place (the conversation continues from it)."""
    return _edit(run_id, column, history, index, new_text, signed(reviewer, request), request)


def shown_in(column: str, left: str | None) -> str:
    """The column name judged(): the left column is the base model unless it shows another run."""
    return str(left) if column == "base" and left and left != "base" else column


def _lit(column: str, thumbs: dict[str, dict[str, str]], chats: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    marks = thumbs.get(column, {})
    return {"feedback_value": [marks.get(str(i)) for i, m in enumerate(chats[column]) if m["role"] == "assistant"]}


def thumbs_shown(column: str, thumbs: dict[str, dict[str, str]], chats: dict[str, list[dict[str, str]]]) -> Any:
    """The chatbot's feedback_value (one entry per reply), so a thumb stays lit when the chat redraws."""
    return gr.update(**_lit(column, thumbs, chats))


def forget_thumbs(columns: tuple[str, ...] = tuple(COLUMN_NAMES)):
    """A new conversation in `columns`: no thumb lit there."""

    def forget(thumbs: dict[str, dict[str, str]] | None) -> dict[str, Any]:
        kept = {col: marks for col, marks in (thumbs or {}).items() if col not in columns}
        return {"thumbs": kept, **{f"{col}_chat": gr.update(feedback_value=[]) for col in columns}}

    return forget


def still_shown(history: list[dict[str, Any]], index: Any, seen: Any) -> None:
    """Refuse a judgement of a reply the chat no longer holds where it was clicked (the conversation moved on,
    was cleared or redrawn between the click and its handling): what was judged must be what is stored."""
    i = index[0] if isinstance(index, (list, tuple)) else index
    seen_text = " ".join(html.unescape(message_text(seen)).split())
    held = history[i] if isinstance(i, int) and 0 <= i < len(history) else None
    if held is None or " ".join(message_text(held["content"]).split()) != seen_text:
        raise TunerError("Not saved: the chat changed after you clicked, so that reply is no longer the one shown "
                         "there. Fix: judge a reply that is on screen now.")


def on_like(column: str):
    """The thumbs under a column's replies (gr.Chatbot feedback) -> a thumb stored with the run."""

    def like(run_id: str | None, chats: dict[str, list[dict[str, str]]] | None, reviewer: str, left: str | None,
             thumbs: dict[str, dict[str, str]] | None, data: gr.LikeData,
             request: gr.Request = None) -> dict[str, Any]:
        chats, thumbs = chats or new_chats(), {col: dict(marks) for col, marks in (thumbs or {}).items()}
        key = str(data.index[0] if isinstance(data.index, (list, tuple)) else data.index)
        if not isinstance(data.liked, bool):  # a thumb taken back: judgements are kept, nothing new to save
            thumbs.get(column, {}).pop(key, None)
            note = "Nothing saved: the thumb was taken back (earlier judgements are kept)."
        else:
            try:
                still_shown(chats[column], data.index, data.value)
            except TunerError as exc:  # the thumb goes out again, and the page says why
                gr.Warning(str(exc))
                return {"feedback_note": md_escape(exc), f"{column}_chat": thumbs_shown(column, thumbs, chats)}
            note = _rate(run_id, shown_in(column, left), chats[column], data.index, data.liked,
                         signed(reviewer, request), request)
            thumbs.setdefault(column, {})[key] = "Like" if data.liked else "Dislike"
        return {"feedback_note": note, "thumbs": thumbs, f"{column}_chat": thumbs_shown(column, thumbs, chats)}

    return friendly(like)


def on_edit(column: str):
    """A reply edited in place -> "write the better reply"; the chat continues from the edited text.
    A refused edit (empty, unchanged, a customer's message) puts the original back and says why."""

    def edit(run_id: str | None, chats: dict[str, list[dict[str, str]]] | None, reviewer: str, left: str | None,
             thumbs: dict[str, dict[str, str]] | None, data: gr.EditData, request: gr.Request = None) -> dict[str, Any]:
        chats, thumbs = chats or new_chats(), {col: dict(marks) for col, marks in (thumbs or {}).items()}
        # the edit box starts from the escaped text the bubble shows (tuner.ui.common.shown): undo that
        text = html.unescape(message_text(data.value))
        try:
            still_shown(chats[column], data.index, data.previous_value)
            note, history = _edit(run_id, shown_in(column, left), chats[column], data.index, text,
                                  signed(reviewer, request), request)
        except TunerError as exc:
            gr.Warning(str(exc))
            return {f"{column}_chat": gr.update(value=bubbles(chats[column]), **_lit(column, thumbs, chats)),
                    "feedback_note": f"Not saved: {md_escape(exc)}"}
        chats = {**chats, column: history}
        # the reply is the reviewer's now: the thumb the model's reply had is no longer lit on it
        thumbs.get(column, {}).pop(str(data.index[0] if isinstance(data.index, (list, tuple)) else data.index), None)
        return {f"{column}_chat": gr.update(value=bubbles(history), **_lit(column, thumbs, chats)), "chats": chats,
                "thumbs": thumbs, "feedback_note": note}

    return friendly(edit)


# -- blind A/B -------------------------------------------------------------------------------------


def parent_of(run_dir: Path) -> str | None:
    """The parent run of a preference run (its status names it), else None."""
    parent = Run(run_dir).status().get("parent")
    return str(parent) if parent else None


def compare_choices(run_id: str | None, request: gr.Request | None) -> tuple[list[tuple[str, str]], str]:
    """What the picked run can be compared with: the base model, its parent (the default for a preference
    run), any other completed run the user sees."""
    if not run_id or run_id not in run_choices(with_result=True, request=request):
        return [("Base model", "base")], "base"
    completed = comparable(run_id, request)
    parent = parent_of(run_folder(run_id, request))
    choices = [("Base model", "base")]
    if parent in completed:
        choices.append((f"Its parent run: {parent}", parent))
    choices += [(rid, rid) for rid in completed if rid not in (run_id, parent)]
    return choices, parent if parent in completed else "base"


def rates_frame(run_dir: Path | None) -> pd.DataFrame:
    """The running win rate of each source in the run's blind votes, with its 95% (Wilson) interval."""
    if run_dir is None:
        return pd.DataFrame(columns=RATE_COLUMNS)
    return win_rates_frame(feedback.report(run_dir)["win_rates"], Run(run_dir).id, parent_of(run_dir))


def ab_views(run_id: str | None, request: gr.Request | None, message: str = "") -> dict[str, Any]:
    """For a newly picked run: what it can be compared with (A/B and the left column; its parent first for a
    preference run), no pair, its votes so far."""
    run_dir = run_folder(run_id, request) if run_id else None
    choices, default = compare_choices(run_id, request)
    return {"ab_compare": gr.update(choices=choices, value=default), "ab_a": "", "ab_b": "",
            "ab_reveal": message, "ab_vote": gr.update(value=None, interactive=False), "ab_state": None,
            "ab_pair_id": "",
            "ab_rates": rates_frame(run_dir), "pg_left": gr.update(choices=choices, value=default)}


@friendly
def ab_reset(run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    return ab_views(run_id, request)


def ab_begin(run_id: str | None) -> dict[str, Any]:
    """The moment a new pair is asked for: the old one leaves the screen and no vote is taken until the new one
    is on it (the state says so at once, before the replies are generated)."""
    return {"ab_a": "", "ab_b": "", "ab_pair_id": "", "ab_reveal": "Asking both models...",
            "ab_vote": gr.update(value=None, interactive=False), "ab_state": {"run": run_id, "generating": True}}


@friendly
def ab_pair(run_id: str | None, compare_with: str | None, message: str, max_new_tokens: float, temperature: float,
            top_p: float, seed: float, repetition_penalty: float, reviewer: str,
            request: gr.Request = None) -> dict[str, Any]:
    """Two replies to one prompt, from the picked run and `compare_with` ("base" or a completed run's id),
    shown as A and B in random order; which is which stays in this session's state until the vote."""
    from tuner.playground import BASE, TUNED

    run_dir = feedback_run(run_id, request)
    run_id = run_dir.name
    message = (message or "").strip()
    if not message:
        raise TunerError("Type a prompt first: both models answer it.")
    other = str(compare_with or "base").strip()
    other_dir = None if other == "base" else other_run(run_dir, other, request)  # checked before any model loads
    settings = generation_config(max_new_tokens, temperature, top_p, seed, repetition_penalty)
    pg = playground()
    info = pg.load_run(run_dir)
    if other_dir is None:
        out = pg.compare({}, message, [BASE, TUNED], settings, run=run_dir)
        replies = {run_id: out[TUNED], "base": out[BASE]}
    else:
        replies = {run_id: pg.reply({}, message, TUNED, settings, run=run_dir)}
        replies[other_dir.name] = pg.reply({}, message, TUNED, settings, run=other_dir)
    prompt = ([{"role": "system", "content": info.system_prompt}] if info.system_prompt else [])
    pair = feedback.blind_pair(prompt + [{"role": "user", "content": message}], replies)
    note = AB_ASK
    if pair.a["text"].strip() == pair.b["text"].strip():
        note += ("\n\nThe two replies are the same word for word, so a vote makes no preference pair. "
                 "Try another prompt, or a temperature above 0 in Sampling.")
    return {"ab_a": pair.a["text"], "ab_b": pair.b["text"], "ab_reveal": note, "ab_pair_id": pair.id,
            "ab_vote": gr.update(value=None, interactive=True),
            "ab_state": {"run": run_id, "pair": pair.to_dict(), "reviewer": signed(reviewer, request)}}


@friendly
def ab_vote(choice: str | None, reviewer: str, pair_id: str | None, state: dict[str, Any] | None,
            request: gr.Request = None) -> dict[str, Any]:
    """Record the vote ("A", "B" or "both bad") on the pair `pair_id` names, the one on screen, then reveal
    which was which and the running win rate per source. A vote for another pair, or cast while a new pair is
    being asked for, is refused and stored nowhere."""
    if state and state.get("generating"):
        raise TunerError("Not saved: a new pair is being asked for, so no pair is on screen. Fix: vote once both "
                         "replies are shown (or ask again if that request failed).")
    if not state or not state.get("pair"):
        raise TunerError("There is no pair to vote on yet. Fix: type a prompt and press Get two replies.")
    on_screen = state["pair"].get("id")
    if str(pair_id or "").strip() != on_screen:
        raise TunerError(f"Not saved: the vote was for pair {str(pair_id or '').strip() or '(none)'}, but pair "
                         f"{on_screen} is the one on screen. Fix: read the two replies shown and vote again.")
    by_word = {"a": "A", "b": "B", "both bad": "both bad", "both": "both bad"}
    choice = by_word.get(str(choice or "").strip().lower(), str(choice or ""))
    run_dir = feedback_run(state["run"], request)
    pair = feedback.BlindPair(**state["pair"])
    revealed = pair.vote(run_dir, choice, signed(reviewer, request) or state.get("reviewer"))
    parent = parent_of(run_dir)
    a, b = (feedback.source_label(revealed[k], state["run"], parent) for k in ("A", "B"))
    verdict = {"A": "A is better", "B": "B is better"}.get(choice, "both bad")
    winner = (f"Winner: **{md_escape(feedback.source_label(revealed['winner'], state['run'], parent))}**."
              if revealed["winner"] else "Both were judged bad: a loss for both.")
    reveal = f"You voted **{verdict}**: A was **{md_escape(a)}**, B was **{md_escape(b)}**. {winner}"
    return {"ab_reveal": reveal, "ab_rates": rates_frame(run_dir), "ab_vote": gr.update(interactive=False),
            "ab_state": {**state, "pair": pair.to_dict()},
            "feedback_note": saved_note(run_dir, f"your blind vote ({verdict})")}


# -- evaluation ------------------------------------------------------------------------------------


def eval_verdict(result: dict[str, Any]) -> str:
    """Which way to ship, in the evaluation's own sentence, and what retrieval was shown."""
    three = result.get("three_way")
    if not three:
        return ("No evaluation of this run yet." if not result.get("rows") else
                "This evaluation predates the three-way comparison: evaluate again to see prompting and retrieval.")
    added = three.get("added_prompt_tokens")
    cost = f", {added:g} more prompt tokens a reply" if isinstance(added, (int, float)) else ""
    return (f"**{md_escape(three['sentence'])}.**\n\nOn {len(result.get('rows') or [])} held-out questions: the base "
            f"model told the brand brief; the same shown the {three['k']} training conversations most like each "
            f"question (retrieval{cost}); the tuned model.")


def eval_tables(result: dict[str, Any]) -> dict[str, Any]:
    from tuner import memorisation
    from tuner.evaluate import METRIC_LABELS, cell_text, table_metrics

    def cell(v: Any) -> Any:
        return cell_text(v, markdown=False) if isinstance(v, dict) or v is None else v

    metrics = [{"metric": METRIC_LABELS.get(name, name), **{label: cell(m.get(col)) for col, label in WAYS.items()},
                "reference": cell(m.get("reference")), "what it means": m.get("explain", "")}
               for name, m in table_metrics(result.get("metrics") or {}) if isinstance(m, dict)]
    rows = [{"prompt": r.get("prompt"), "reference": r.get("reference"),
             **{label: r.get(col) for col, label in WAYS.items()}} for r in result.get("rows") or []]
    memorised = (result.get("metrics") or {}).get(memorisation.METRIC) or {}
    return {"eval_verdict": eval_verdict(result), "eval_metrics": pd.DataFrame(metrics, columns=METRIC_COLUMNS),
            "eval_rows": pd.DataFrame(rows, columns=EVAL_COLUMNS),
            "eval_memorised": "**What the tuned model memorised:** " + memorisation.markdown(memorised, md_escape)
            if memorised.get("sentence") else ""}


@friendly
def evaluate_run(run_id: str | None, prompts: float, max_new_tokens: float, temperature: float, top_p: float,
                 seed: float, repetition_penalty: float, progress: gr.Progress = gr.Progress(),  # noqa: B008
                 request: gr.Request = None) -> dict[str, Any]:
    """Answer held-out prompts three ways (prompted base, retrieved examples, tuned) and score them; progress
    says n of N prompts."""
    from tuner import evaluate

    run_dir = run_folder(run_id, request, "chat")
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
        return saved_evaluation(run_id, request)
    finally:
        drop_flag(request, "eval", stop)
    return eval_tables(result)


def press_eval_stop(request: gr.Request = None) -> None:
    signal_stop(request, "eval")


@friendly
def saved_evaluation(run_id: str | None, request: gr.Request = None) -> dict[str, Any]:
    """The last evaluation of a run (eval.json), if it has one."""
    from tuner.evaluate import saved_result

    return eval_tables(saved_result(run_folder(run_id, request)) if run_id else {})


@friendly
def playground_runs(current: str | None, request: gr.Request = None):
    """Runs with a result for the playground picker, keeping the current pick while it is still there."""
    completed = run_choices(with_result=True, request=request)
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
                                  info="A run with its result saved; without one only the base model answers.")
        c["pg_left"] = gr.Dropdown([("Base model", "base")], value="base", label="Left column", scale=2,
                                   allow_custom_value=True, elem_id="pg-left",
                                   info="The base model, or another run beside the tuned one (e.g. its parent).")
        c["with_prompted"] = gr.Checkbox(False, label="Also show prompt-only", scale=2,
                                         info="The base model told the brand brief: what prompting alone gets.")
        c["reviewer"] = gr.Textbox(label="Reviewer (optional)", scale=2, max_length=80, elem_id="reviewer",
                                   placeholder="Your name, saved with each judgement")
    with gr.Row(equal_height=True):
        for name, label, elem, visible in (("base_chat", "Base model", "chat-base", True),
                                           ("tuned_chat", "Tuned", "chat-tuned", True),
                                           ("prompted_chat", "Prompt-only", "chat-prompted", False)):
            # thumbs under each reply, and a reply edited in place is "the better reply" (tuner.feedback)
            # replies are Markdown (agents write **bold** and lists): rendered, with HTML shown as text (bubbles)
            c[name] = gr.Chatbot(label=label, height=380, elem_id=elem, feedback_options=("Like", "Dislike"),
                                 editable="all", visible=visible, render_markdown=True, sanitize_html=True,
                                 buttons=["copy_all"])
    with gr.Row():
        c["msg"] = gr.Textbox(placeholder="Ask what your customers ask… (Enter sends to every column)",
                              show_label=False, scale=5, elem_id="chat-input", max_length=4000)
        c["send_btn"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        c["stop_btn"] = gr.Button("Stop", variant="stop", scale=1, visible=False, elem_id="chat-stop")
        c["clear_btn"] = gr.Button("Clear", scale=1, elem_id="chat-clear")
    c["feedback_note"] = gr.Markdown("Judge any reply: thumbs up or down under it, or edit it (pencil) to write the "
                                     "better reply; both are saved with the tuned run.", elem_id="feedback-note")
    with gr.Accordion("Sampling (the same for every column, so the comparison is fair)", open=False), gr.Row():
        c["max_new"] = gr.Slider(1, limits.MAX_NEW_TOKENS, value=gen["max_new_tokens"], step=1, elem_id="max-new",
                                 label="Max new tokens", info=gen_help["max_new_tokens"])
        c["temperature"] = gr.Slider(0.0, 2.0, value=gen["temperature"], step=0.05, label="Temperature",
                                     info=gen_help["temperature"])
        c["top_p"] = gr.Slider(0.05, 1.0, value=gen["top_p"], step=0.05, label="Top-p", info=gen_help["top_p"])
        c["seed"] = gr.Number(gen["seed"], precision=0, label="Seed", info=gen_help["seed"])
        c["rep"] = gr.Slider(1.0, 2.0, value=gen["repetition_penalty"], step=0.05, label="Repetition penalty",
                             info=gen_help["repetition_penalty"])
    with gr.Accordion("Blind A/B: which reply is better?", open=False, elem_id="ab-section"):
        with gr.Row():
            c["ab_compare"] = gr.Dropdown([("Base model", "base")], value="base", label="Compare the tuned run with",
                                          allow_custom_value=True, scale=2, elem_id="ab-compare",
                                          info="The base model, the run's parent (for a preference run), or any "
                                               "completed run.")
            c["ab_msg"] = gr.Textbox(label="Prompt", scale=4, max_length=4000, elem_id="ab-input",
                                     placeholder="A customer's question; both answer it with the Sampling settings")
            c["ab_go"] = gr.Button("Get two replies", variant="primary", scale=1, elem_id="ab-go")
        with gr.Row(equal_height=True):
            c["ab_a"] = gr.Textbox(label="Reply A", lines=5, interactive=False, elem_id="ab-a")
            c["ab_b"] = gr.Textbox(label="Reply B", lines=5, interactive=False, elem_id="ab-b")
        with gr.Row():
            c["ab_vote"] = gr.Radio(AB_CHOICES, label="Your vote (saved as soon as you pick)", interactive=False,
                                    elem_id="ab-vote", scale=4)
            c["ab_pair_id"] = gr.Textbox(label="Pair", interactive=False, max_lines=1, elem_id="ab-pair-id", scale=1,
                                         info="Your vote is stored for this pair only")
        c["ab_reveal"] = gr.Markdown(elem_id="ab-reveal")
        c["ab_rates"] = gr.Dataframe(pd.DataFrame(columns=RATE_COLUMNS), label="Win rate per source in this run's "
                                     "blind votes ('both bad' counts as a loss for both)", interactive=False,
                                     elem_id="ab-rates", wrap=True, column_widths=RATE_WIDTHS)
        c["ab_state"] = gr.State(None)  # this session's pair, its order hidden until the vote
    c["thumbs"] = gr.State(dict)  # {column: {reply index: "Like"|"Dislike"}}: the thumbs lit in this session
    with gr.Accordion("Evaluation: prompt, retrieve or tune? Did it learn the voice, did it forget anything?",
                      open=False, elem_id="eval-section"):
        with gr.Row():
            c["eval_prompts"] = gr.Slider(1, EVAL_MAX_PROMPTS, value=EVAL_PROMPTS, step=1, label="Held-out prompts",
                                          scale=3, elem_id="eval-prompts",
                                          info="From the run's validation split (each distinct prompt once); "
                                               "each way answers each.")
            c["eval_btn"] = gr.Button("Evaluate: prompt, retrieve or tune", scale=1, elem_id="eval-run")
            c["eval_stop"] = gr.Button("Stop the evaluation", variant="stop", scale=1, elem_id="eval-stop")
        c["eval_verdict"] = gr.Markdown("No evaluation of this run yet.", elem_id="eval-verdict")
        c["eval_metrics"] = gr.Dataframe(pd.DataFrame(columns=METRIC_COLUMNS), label="Three ways on the same questions",
                                         interactive=False, wrap=True, elem_id="eval-metrics",
                                         column_widths=["18%", "11%", "11%", "11%", "11%", "38%"])
        c["eval_memorised"] = gr.Markdown(elem_id="eval-memorised")
        c["eval_rows"] = gr.Dataframe(pd.DataFrame(columns=EVAL_COLUMNS),
                                      label="Replies: the question, your agents' reply, then the three ways side by side",
                                      interactive=False, wrap=True, max_height=600, elem_id="eval-rows",
                                      column_widths=["16%", "21%", "21%", "21%", "21%"])
    return c


def wire(c: Components) -> None:
    """The Playground tab's events (the tab itself is `c["playground_tab"]`)."""
    inputs = pick(c, "msg", "pg_run", "with_prompted", "max_new", "temperature", "top_p", "seed", "rep", "chats",
                  "pg_left")
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
    c["pg_run"].change(keyed(saved_evaluation, c), c["pg_run"], pick(c, *EVAL_OUTPUTS),
                       api_name="saved_evaluation")
    c["pg_run"].change(keyed(clear_chats, c), outputs=[*outputs, *buttons], api_name="new_chat",
                       api_visibility="private")
    c["eval_btn"].click(keyed(evaluate_run, c),
                        pick(c, "pg_run", "eval_prompts", "max_new", "temperature", "top_p", "seed", "rep"),
                        pick(c, *EVAL_OUTPUTS), api_name="evaluate", concurrency_limit=1)
    c["eval_stop"].click(press_eval_stop, api_name="stop_evaluation", api_visibility="private", queue=False)
    wire_feedback(c)


def wire_feedback(c: Components) -> None:
    """Thumbs and edits in the chats, the blind A/B pair and vote, and the plain API endpoints."""
    for column in ("base", "tuned", "prompted"):
        chatbot = c[f"{column}_chat"]
        chatbot.like(keyed(on_like(column), c), pick(c, "pg_run", "chats", "reviewer", "pg_left", "thumbs"),
                     pick(c, "feedback_note", "thumbs", f"{column}_chat"), api_name=f"like_{column}",
                     api_visibility="private")
        chatbot.clear(keyed(forget_thumbs((column,)), c), c["thumbs"], pick(c, "thumbs", f"{column}_chat"),
                      api_name=f"forget_thumbs_{column}", api_visibility="private")
        chatbot.edit(keyed(on_edit(column), c), pick(c, "pg_run", "chats", "reviewer", "pg_left", "thumbs"),
                     pick(c, f"{column}_chat", "chats", "thumbs", "feedback_note"),
                     api_name=f"edit_{column}", api_visibility="private")
    every_chat = pick(c, "thumbs", "base_chat", "tuned_chat", "prompted_chat")
    for name, trigger in (("clear", c["clear_btn"].click), ("run", c["pg_run"].change), ("left", c["pg_left"].change)):
        trigger(keyed(forget_thumbs(), c), c["thumbs"], every_chat, api_name=f"forget_thumbs_{name}",
                api_visibility="private")
    # the same actions with plain arguments, for scripts and tests (gradio_client)
    gr.api(rate_reply, api_name="rate_reply")
    gr.api(edit_reply, api_name="edit_reply")
    ab_outputs = pick(c, "ab_a", "ab_b", "ab_reveal", "ab_vote", "ab_state", "ab_pair_id")
    for trigger, name, visibility in ((c["ab_go"].click, "ab_pair", "public"),
                                      (c["ab_msg"].submit, "ab_pair_submit", "private")):
        # the old pair leaves the screen at once (unqueued), then both models answer
        trigger(keyed(ab_begin, c), c["pg_run"], ab_outputs, queue=False, api_name=f"{name}_begin",
                api_visibility="private").then(
            keyed(ab_pair, c), pick(c, "pg_run", "ab_compare", "ab_msg", "max_new", "temperature", "top_p", "seed",
                                    "rep", "reviewer"),
            ab_outputs, api_name=name, api_visibility=visibility, concurrency_limit=CHAT_CONCURRENCY,
            concurrency_id="chat")
    c["ab_vote"].input(keyed(ab_vote, c), pick(c, "ab_vote", "reviewer", "ab_pair_id", "ab_state"),
                       pick(c, "ab_reveal", "ab_rates", "ab_vote", "ab_state", "feedback_note"), api_name="ab_vote")
    c["pg_run"].change(keyed(ab_reset, c), c["pg_run"],
                       pick(c, "ab_compare", "ab_a", "ab_b", "ab_reveal", "ab_vote", "ab_state", "ab_pair_id", "ab_rates",
                            "pg_left"),
                       api_name="ab_reset")
    # the left column shows another model: a new conversation, labelled with that model
    c["pg_left"].change(keyed(left_changed, c), pick(c, "pg_left", "pg_run"),
                        pick(c, *CHAT_VIEWS, "send_btn", "stop_btn"), api_name="left_column", api_visibility="private")
