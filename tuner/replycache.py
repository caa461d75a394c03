"""The base model's replies, kept per model, prompt set and generation settings: the base never changes
between runs, so a run's voice check asks it only once per machine.

A key names everything the replies depend on: the base model's folder and its weight files (name,
size, modification time), the prompts exactly as the model reads them (chat template applied), the
generation settings, the serving dtype and device, and the versions of tuner, torch and transformers.
Entries live in TUNER_HOME/cache/base_replies/<key>.json, written atomically. The same store keeps other
figures of the base that runs repeat (`kind`): its validation loss before training (tuner.train.trainer).

Light module: no torch import (the caller passes the dtype and versions as text).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tuner import __version__
from tuner.paths import tuner_home

CACHE_DIR = ("cache", "base_replies")
WEIGHT_SUFFIXES = (".safetensors", ".json")  # weights, config, generation config, tokenizer


def weights_fingerprint(model_dir: str | Path) -> str:
    """Changes when any weight or config file of the model folder does (name, size, modification time)."""
    folder = Path(model_dir)
    parts = [str(folder.resolve())]
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix in WEIGHT_SUFFIXES and p.is_file():
                st = p.stat()
                parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_key(model_dir: str | Path, prompt_texts: list[str], settings: dict[str, Any], dtype: str, device: str,
              versions: dict[str, str]) -> str:
    """One key for the base's replies to these prompts under these settings (see the module docstring)."""
    parts = {"model": weights_fingerprint(model_dir), "prompts": hashlib.sha256(
        json.dumps(prompt_texts, ensure_ascii=False).encode()).hexdigest(), "settings": settings,
        "dtype": dtype, "device": device, "tuner": __version__, **versions}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _path(key: str, kind: str = CACHE_DIR[1]) -> Path:
    return tuner_home().joinpath(CACHE_DIR[0], kind, f"{key}.json")


def read_entry(key: str, kind: str) -> dict[str, Any] | None:
    """The cached entry of this kind, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(_path(key, kind).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read(key: str) -> dict[str, Any] | None:
    """The cached replies ({"replies", "ended", ...}), or None when there are none (or they are unreadable)."""
    data = read_entry(key, CACHE_DIR[1])
    ok = data is not None and isinstance(data.get("replies"), list) and isinstance(data.get("ended"), list)
    return data if ok and len(data["replies"]) == len(data["ended"]) else None


def write(key: str, entry: dict[str, Any], kind: str = CACHE_DIR[1]) -> None:
    """Store an entry atomically; a read-only home just means the next run asks the base again."""
    path = _path(key, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**entry, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, ensure_ascii=False),
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
