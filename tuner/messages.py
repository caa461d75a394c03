"""One message schema end to end: `{"role", "content"}` in files, datasets, the trainer and the page.

The converter writes chat examples as JSON Lines (`{"messages": [...]}` a line); everything that reads
them back reads them here, with one set of rules and errors that name the file, the line and the fix.
Light module: standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict

from tuner.errors import DataError

ROLES = ("system", "user", "assistant")


class Message(TypedDict, total=False):
    """A chat turn. `weight: 0` (OpenAI's format) keeps an assistant turn out of the loss."""

    role: str
    content: str
    weight: int


def validate_messages(messages: Any) -> str | None:
    """What is wrong with a conversation's messages, in words, or None when it is well formed.

    >>> validate_messages([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    'message 1 needs a role (system, user, assistant) and a text content.'
    """
    if not isinstance(messages, list) or not messages:
        return 'expected {"messages": [{"role": ..., "content": ...}, ...]}.'
    for i, msg in enumerate(messages):
        if not (isinstance(msg, dict) and msg.get("role") in ROLES and isinstance(msg.get("content"), str)):
            return f"message {i} needs a role ({', '.join(ROLES)}) and a text content."
    return None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; DataError naming the line for invalid JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"not valid JSON ({exc.args[0]}). Fix: one JSON object per line.",
                                    file=str(path), line=number) from None
                yield number, value
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text. Fix: re-run `python -m tuner convert`.", file=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot open ({exc.strerror}).", file=str(path)) from exc


def read_jsonl(path: str | Path) -> list[Any]:
    """Every value of a JSON Lines file, in order."""
    return [value for _, value in iter_jsonl(path)]


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write one JSON value a line (UTF-8, not ASCII-escaped); returns the number of rows."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read one chat example per line ({"messages": [{"role", "content"}, ...]}), checking the shape.

    Each returned example carries `_line` (1-based) so later reports can name it.
    """
    rows: list[dict[str, Any]] = []
    for number, row in iter_jsonl(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        problem = validate_messages(messages)
        if problem is not None:
            fix = ("Fix: run `python -m tuner convert` on the raw export." if not isinstance(messages, list)
                   or not messages else "")
            raise DataError(f"{problem} {fix}".strip(), file=str(path), line=number)
        rows.append({"messages": messages, "_line": number})
    return rows
