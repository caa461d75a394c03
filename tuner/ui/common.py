"""What every tab shares: errors in plain words, handlers keyed by component name, run ids, escaping.

A tab's handler returns {name: value}; `keyed(fn, c)` turns that into Gradio's {component: value}
with `c` the page's components by name, so a handler never depends on the order of an outputs list.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from tuner import audit as tuner_audit
from tuner import auth
from tuner.auth import User
from tuner.errors import RunNotFound, TunerError
from tuner.paths import check_run_id, runs_dir

log = logging.getLogger("tuner.app")

Components = dict[str, Any]  # a page's components by name
RUN_STATES_ACTIVE = ("queued", "running")


# -- errors ------------------------------------------------------------------------------------------


def plain_error(exc: BaseException, secret: str = "") -> gr.Error:
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
                raise plain_error(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise plain_error(exc) from None

    return wrapper


def keyed(fn: Callable, c: Components) -> Callable:
    """`fn` returns (or yields) {component name: value}; Gradio gets {component: value}."""

    def by_component(values: Any) -> Any:
        return {c[name]: value for name, value in values.items()} if isinstance(values, dict) else values

    if inspect.isgeneratorfunction(inspect.unwrap(fn)):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for values in fn(*args, **kwargs):
                yield by_component(values)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return by_component(fn(*args, **kwargs))

    return wrapper


def pick(c: Components, *names: str) -> list[Any]:
    """Components by name, in the order given (an event's inputs or outputs)."""
    return [c[n] for n in names]


# -- text --------------------------------------------------------------------------------------------


def md_escape(text: Any) -> str:
    """User-given text (file names, speakers, reasons) shown literally inside Markdown."""
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~])", r"\\\1", str(text))


def shown(text: str) -> str:
    """Message text for a gr.Chatbot: its Markdown rendered, its HTML shown as text, never interpreted."""
    return html.escape(text, quote=False)


def bubbles(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """User/assistant messages as chat bubbles showing their exact text (a system prompt is shown apart)."""
    return [{"role": m["role"], "content": shown(m["content"])} for m in messages if m["role"] in ("user", "assistant")]


# -- runs on disk --------------------------------------------------------------------------------------


def user_of(request: gr.Request | None) -> User:
    """Who makes this request (tuner.auth.current_user); refused when the server asks for a login and nobody
    is signed in."""
    user = auth.current_user(request)
    if user is None:
        raise TunerError(auth.refusal(None, "read"))
    return user


def run_folder(run_id: str | None, request: gr.Request | None, action: str = "read") -> Path:
    """The folder of a run named by id, if the user making `request` may do `action` with it (tuner.auth.can).

    Ids are plain folder names (never paths) under runs_dir(). Another team's run reads as no run at all,
    so a stranger cannot even learn that the id exists; a reviewer asking to delete (etc.) hears why not.
    """
    if not run_id or not str(run_id).strip():
        raise TunerError("Pick a run first.")
    from tuner.runs import Run

    run_id = check_run_id(str(run_id).strip())  # security: rejects '../', '/etc', '%2e%2e' and the like
    run = Run(runs_dir() / run_id)
    user = user_of(request)
    owner = run.owner()
    if not run.exists() or not auth.sees_run(user, owner):
        raise RunNotFound(f"There is no run named '{run_id}'.")
    if not auth.can(user, action, owner):
        raise TunerError(auth.refusal(user, action))
    return run.path


def queue_name(request: gr.Request | None) -> str:
    """The name the machine's queue gives this user's jobs: the signed-in name, or "" on a server nobody signs
    in to (one person's server: the queue names runs, not people)."""
    user = user_of(request)
    return user.name if auth.mode() != "none" else ""


def audit(request: gr.Request | None, action: str, run_dir: Path, detail: str = "") -> None:
    """Write who did `action` to which run into the server's audit log (tuner.audit)."""
    from tuner.runs import Run

    tuner_audit.record(user_of(request).name, action, run_dir.name, Run(run_dir).owner(), detail)


def list_runs(request: gr.Request | None = None) -> list[dict[str, Any]]:
    """The runs the user making `request` may see, newest first (tuner.jobs.list_runs, filtered)."""
    from tuner import jobs

    user = user_of(request)
    return [r for r in jobs.list_runs() if auth.sees_run(user, r.get("owner"))]


def run_choices(with_result: bool = False, request: gr.Request | None = None) -> list[str]:
    """Run ids the user sees, newest first; `with_result`: only runs whose result can be served
    (tuner.runs.has_result)."""
    runs = list_runs(request)
    if with_result:
        runs = [r for r in runs if r.get("has_result")]
    return [r["id"] for r in runs]


def active_run(request: gr.Request | None = None, runs: list[dict[str, Any]] | None = None) -> str | None:
    """The user's run training now (or queued), else their newest run, for a page that opens."""
    runs = list_runs(request) if runs is None else runs
    for r in runs:
        if r.get("status") in RUN_STATES_ACTIVE:
            return r["id"]
    return runs[0]["id"] if runs else None


@functools.lru_cache(maxsize=1)
def playground() -> Any:
    """The one Playground of this process: model weights are shared by every session, chats are not."""
    from tuner.playground import Playground

    return Playground()


# -- feedback ----------------------------------------------------------------------------------------

RATE_COLUMNS = ["source", "wins", "votes", "win rate", "95% interval"]
RATE_WIDTHS = ["40%", "12%", "12%", "14%", "22%"]  # the source (a run's id) wide enough to read whole


def win_rates_frame(win_rates: dict[str, dict[str, Any]], run_id: str, parent: str | None):
    """Blind-vote win rate of each source (tuner.feedback.report's `win_rates`) with its 95% (Wilson)
    interval, the sources named as the playground names them; the same table on both tabs."""
    import pandas as pd

    from tuner.feedback import source_label

    rows = [{"source": source_label(source, run_id, parent), "wins": r["wins"], "votes": r["votes"],
             "win rate": f"{r['rate']:.0%}" if r["rate"] is not None else "—",
             "95% interval": f"{r['low']:.0%} to {r['high']:.0%}"} for source, r in win_rates.items()]
    return pd.DataFrame(rows, columns=RATE_COLUMNS)
