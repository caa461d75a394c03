"""The machine's queue: prepared runs waiting for the one training slot, first come, first served.

One file, `TUNER_HOME/queue.json`, that survives an app restart:

    {"version": 1,
     "queue": [{"run": "run-20261202-141502-a1b2",          the run's id (its folder's name)
                "path": "/home/me/.cache/tuner/runs/run-...", the run folder (a CLI --out may be elsewhere)
                "owner": "alice",                             who queued it ("" when nobody is signed in)
                "queued_at": 1764684902.1,                    seconds since the epoch
                "resume": false,                              continue from its last checkpoint when started
                "estimate_s": 212.5}]}                        tuner.jobs.estimate's time, null when unknown

Every change happens under an exclusive flock on `TUNER_HOME/queue.lock` (a separate file, because
queue.json itself is replaced atomically on every write), so two processes (the app, a training
job that ends, a command waiting in line) never lose or duplicate an entry. Who starts the head of
the queue, and when, is `tuner.jobs.dispatch`'s business; this module only keeps the list.
Light module: no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.paths import tuner_home
from tuner.runs import read_json_object, write_json_atomic

QUEUE_FILE = "queue.json"
QUEUE_LOCK = "queue.lock"
VERSION = 1
FIELDS = ("run", "path", "owner", "queued_at", "resume", "estimate_s")

Entry = dict[str, Any]


def queue_file() -> Path:
    return tuner_home() / QUEUE_FILE


def _valid(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("run"), str) and isinstance(entry.get("path"), str)


def entries() -> list[Entry]:
    """The queue, head first, as it is now (a consistent snapshot: the file is replaced atomically)."""
    found = read_json_object(queue_file()).get("queue")
    return [e for e in found if _valid(e)] if isinstance(found, list) else []


@contextlib.contextmanager
def locked() -> Iterator[list[Entry]]:
    """The queue under an exclusive lock, to change in place; written back (atomically) if it changed.

    Blocks while another process holds it (holders only read and write a small file, and start a
    process at most). Not re-entrant: never nest two `locked()` in one process."""
    fd = os.open(tuner_home() / QUEUE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        queue = entries()
        before = [dict(e) for e in queue]
        yield queue
        if queue != before:
            write_json_atomic(queue_file(), {"version": VERSION, "queue": queue})
    finally:
        os.close(fd)  # closing the only descriptor of the open file releases the lock


def new_entry(run_dir: Path, owner: str, queued_at: float, resume: bool, estimate_s: float | None) -> Entry:
    return {"run": run_dir.name, "path": str(run_dir), "owner": owner, "queued_at": round(queued_at, 3),
            "resume": bool(resume), "estimate_s": estimate_s}


def index_of(queue: list[Entry], run_dir: Path) -> int | None:
    """Where the run waits in `queue` (0 is the head), or None."""
    return next((i for i, e in enumerate(queue) if e["path"] == str(run_dir)), None)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st.

    >>> [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)]
    ['1st', '2nd', '3rd', '4th', '11th', '12th', '13th', '21st', '22nd']
    """
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
