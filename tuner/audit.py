"""The server's audit log: who trained, exported, published and deleted which run, and when.

One JSON object a line in `tuner.paths.audit_file()` (TUNER_HOME/audit.jsonl), each appended with one
O_APPEND write: lines from several processes never interleave, and nothing ever rewrites the file.
Each entry records the run's owner and teams as they were, so a team keeps seeing the history of a run
it deleted, and nobody else sees it. Light module: standard library only.

    {"time": "2026-12-02T14:03:11+0000", "user": "alice", "action": "delete", "run": "run-...",
     "owner": "alice", "teams": ["support"], "detail": "..."}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.paths import audit_file

ACTIONS = ("train", "resume", "cancel", "export", "push", "publish", "delete")
READ_LIMIT = 200  # entries the page shows, newest first


def record(user: str, action: str, run_id: str, owner: dict[str, Any] | None, detail: str = "") -> dict[str, Any]:
    """Append one entry (one write with O_APPEND: never a torn or interleaved line, never a rewrite)."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "user": user, "action": action, "run": run_id,
             "owner": (owner or {}).get("name"), "teams": list((owner or {}).get("teams") or [])}
    if detail:
        entry["detail"] = detail
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(audit_file(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return entry


def record_cli(action: str, run: str | Path, detail: str = "") -> None:
    """An entry for a command-line action on a run (id or folder): by the machine's user."""
    from tuner.auth import machine_user
    from tuner.runs import resolve

    found = resolve(run)
    record(machine_user(), action, found.id, found.owner(), detail)


def entries(visible: Callable[[dict[str, Any] | None], bool], limit: int = READ_LIMIT) -> list[dict[str, Any]]:
    """The newest `limit` entries whose run the reader may see (`visible(owner record)`), newest first; a
    damaged line is skipped."""
    out: list[dict[str, Any]] = []
    try:
        with open(audit_file(), encoding="utf-8") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return out
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        owner = {"name": entry.get("owner"), "teams": entry.get("teams") or []} if entry.get("owner") else None
        if visible(owner):
            out.append(entry)
            if len(out) >= limit:
                break
    return out
