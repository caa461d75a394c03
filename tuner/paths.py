"""Where tuner keeps its files: model cache, runs, uploads.

`$TUNER_HOME` wins; on a Hugging Face Space with persistent storage it is `/data/tuner`;
otherwise `~/.cache/tuner`. Run ids are checked here, once, so no caller can escape `runs/`.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

from tuner.errors import RunNotFound

# security: a run id is a single, plain folder name; nothing else reaches the filesystem
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def tuner_home() -> Path:
    """The root folder for caches and runs (created on first use)."""
    env = os.environ.get("TUNER_HOME")
    if env:
        home = Path(env).expanduser()
    elif persistent_storage():
        home = Path("/data/tuner")
    else:
        home = Path.home() / ".cache" / "tuner"
    home.mkdir(parents=True, exist_ok=True)
    return home


def persistent_storage() -> bool:
    """True on a Space with persistent storage mounted at /data."""
    return Path("/data").is_dir() and os.access("/data", os.W_OK)


def models_dir() -> Path:
    """Converted/downloaded base models; `$TUNER_MODELS_DIR` lets several homes share one cache."""
    env = os.environ.get("TUNER_MODELS_DIR")
    d = Path(env).expanduser() if env else tuner_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_dir() -> Path:
    d = tuner_home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def uploads_dir() -> Path:
    d = tuner_home() / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def audit_file() -> Path:
    """The server's one append-only log of who trained, exported, published and deleted what (tuner.audit)."""
    return tuner_home() / "audit.jsonl"


def new_run_id(prefix: str = "run") -> str:
    """A sortable, unique run id such as `run-20261121-233012-a1b2`."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is a safe folder name, else raise RunNotFound."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:  # fullmatch: no "id\n"
        raise RunNotFound(f"'{run_id}' is not a valid run id (letters, digits, '-', '_' and '.' only).")
    return run_id
