"""Server-side limits, enforced in the library (not only in the page). Override with env vars."""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


MAX_UPLOAD_BYTES = _env_int("TUNER_MAX_UPLOAD_MB", 200) * 1024 * 1024  # per file
MAX_FILES = _env_int("TUNER_MAX_FILES", 20)  # per conversion
MAX_CONVERSATIONS = _env_int("TUNER_MAX_CONVERSATIONS", 200_000)  # per dataset
MAX_EXAMPLE_TOKENS = _env_int("TUNER_MAX_EXAMPLE_TOKENS", 8192)  # max_length ceiling
MAX_NEW_TOKENS = _env_int("TUNER_MAX_NEW_TOKENS", 1024)  # per reply
MAX_INPUT_TOKENS = _env_int("TUNER_MAX_INPUT_TOKENS", 2048)  # prompt + history fed to generate
MAX_LINE_BYTES = _env_int("TUNER_MAX_LINE_MB", 16) * 1024 * 1024  # one JSONL line / text line
QUEUE_SIZE = _env_int("TUNER_QUEUE_SIZE", 32)  # Gradio queue max_size
