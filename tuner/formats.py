"""Export shapes -> conversations: format detection and one plain parser per shape.

Every parser takes a `Source` (the file plus the user's column names) and yields, in file order,
`Conversation`s and `Dropped` records. Nothing is read whole when the shape allows streaming:
JSONL, CSV and transcripts go line by line, JSON arrays element by element, and one-row-per-message
exports are grouped on disk (sqlite) so rows may arrive in any order. Speaker labels stay as
written ("Agent Rosa", "gpt"); `tuner.dataset` maps them to roles. A transcript's speakers are learned
from the whole file first (`learn_speakers`), so code or notes inside a reply stay in the reply.

>>> # for item in PARSERS["openai-jsonl"](Source(Path("chats.jsonl"))): ...
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuner import limits
from tuner.errors import DataError
from tuner.roles import role_of
from tuner.words import agree, plural

# -- drop categories (after OpenAI's published fine-tuning data checks) ---------------------------
UNPARSEABLE = "unparseable"
NOT_OBJECT = "not an object"
NO_MESSAGES = "no messages"
MISSING_FIELD = "missing role or content"
UNRECOGNIZED_ROLE = "unrecognized role"
UNMAPPED_SPEAKER = "unmapped speaker"
EMPTY_CONTENT = "empty or non-text content"
NO_ASSISTANT = "no assistant reply"
TOO_LONG = "too long"
OVER_LIMIT = "over limit"
UNREADABLE_FILE = "unreadable file"
CATEGORIES = (UNPARSEABLE, NOT_OBJECT, NO_MESSAGES, MISSING_FIELD, UNRECOGNIZED_ROLE, UNMAPPED_SPEAKER,
              EMPTY_CONTENT, NO_ASSISTANT, TOO_LONG, OVER_LIMIT, UNREADABLE_FILE)

SNIFF_BYTES = 1 << 20  # encoding and format are guessed from the first MiB
CSV_SUFFIXES = (".csv", ".tsv")


@dataclass
class Conversation:
    """One conversation as exported: messages are {"role": label as written, "content": str} (+ "weight")."""

    messages: list[dict[str, Any]]
    file: str
    line: int  # 1-based line (or CSV row start) where the conversation begins
    end_line: int
    strict_roles: bool  # labels come from a role schema (OpenAI, ShareGPT), not free speaker names
    id: str | None = None


@dataclass
class Dropped:
    """A line, row or conversation that was not kept, and why."""

    file: str
    line: int
    category: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "category": self.category, "reason": self.reason}


Item = Conversation | Dropped


@dataclass
class Source:
    """A file to parse, with what the user told us about it; parsers fill in the counters."""

    path: Path
    name: str = ""  # how reports name the file
    column_map: dict[str, str] = field(default_factory=dict)
    rows_read: int = 0  # records (JSON lines/elements, CSV rows, transcript lines with text)
    bytes_read: int = 0  # how far reading has got, for progress bars
    max_lines: int | None = None  # stop early (a quick look for detection)
    encoding: str = ""
    columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # file-level warnings for the report

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.name = self.name or self.path.name


# -- reading bytes as text, line by line -------------------------------------------------------------


def check_size(path: Path, name: str | None = None) -> None:
    """Refuse files over the per-file upload limit before reading them."""
    size = path.stat().st_size
    if size > limits.MAX_UPLOAD_BYTES:
        raise DataError(f"the file is {size / 2**20:.0f} MB; the limit is {limits.MAX_UPLOAD_BYTES // 2**20} MB "
                        "per file. Split it into smaller files.", name or path.name)


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def sniff_encoding(head: bytes, name: str) -> str:
    """The text encoding of a file from its first bytes: BOMs, UTF-16 without BOM, UTF-8, then legacy pages."""
    if not head.strip():
        raise DataError("the file is empty.", name)
    for magic, kind in ((b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip-compressed"),
                        (b"%PDF", "a PDF document"), (b"\xd0\xcf\x11\xe0", "an old Excel/Word file")):
        if head.startswith(magic):
            raise DataError(f"this is {kind}, not a text export. Extract or export the conversations as JSONL, "
                            "CSV or plain text and upload those.", name)
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return encoding
    if b"\x00" in head:
        half = max(1, len(head) // 2)
        even, odd = head[0::2].count(0) / half, head[1::2].count(0) / half
        if odd > 0.3 and even < 0.05:  # mostly ASCII text in UTF-16 without a BOM
            return "utf-16-le"
        if even > 0.3 and odd < 0.05:
            return "utf-16-be"
        raise DataError("this looks like a binary file, not a text export (it contains NUL bytes). "
                        "Export the conversations as JSONL, CSV or plain text.", name)
    try:
        head.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3 and exc.reason == "unexpected end of data":
            return "utf-8"  # the sample cut a multi-byte character in half
    # UTF-8 with a few corrupt bytes (reported line by line) rather than a legacy code page
    valid = sum(len(m) for m in _UTF8_MULTIBYTE.findall(head))
    high = sum(1 for b in head if b >= 0x80)
    if valid and valid >= (high - valid) * 4:
        return "utf-8"
    from charset_normalizer import from_bytes

    results = from_bytes(head)
    best = results.best()
    if best is None:
        raise DataError("this does not look like text in any known encoding. Save it as UTF-8 text.", name)
    # ties are common among Latin pages (cp1250 vs cp1252 for French); Windows-1252 is the usual export
    tied = [r for r in results if (r.chaos, r.coherence) == (best.chaos, best.coherence)]
    if any("cp1252" in r.could_be_from_charset for r in tied):
        return "cp1252"
    return best.encoding


def _ascii_compatible(encoding: str) -> bool:
    return not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def lines(src: Source, keep_ends: bool = False) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) for every line; text is None when the line could not be read.

    Lines longer than MAX_LINE_BYTES are skipped (and reported) without being held in memory.
    """
    check_size(src.path, src.name)
    limit = limits.MAX_LINE_BYTES
    with open(src.path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
        src.encoding = sniff_encoding(head, src.name)
        fh.seek(0)
        cr_only = b"\r" in head and b"\n" not in head
        end = "\n" if keep_ends else ""
        if _ascii_compatible(src.encoding) and not cr_only:
            if src.encoding == "utf-8-sig":
                fh.read(3)
            lineno = 0
            while (raw := fh.readline(limit + 1)) and lineno != src.max_lines:
                lineno += 1
                src.bytes_read += len(raw)
                if len(raw) > limit and not raw.endswith(b"\n"):
                    while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # skip the rest of the overlong line without keeping it
                    yield lineno, None, (f"the line is longer than {limit // 2**20} MB (the limit per line); "
                                         "split it or export one record per line")
                    continue
                try:
                    text = raw.decode(src.encoding)
                except UnicodeDecodeError as exc:
                    yield lineno, None, (f"not valid {src.encoding} text (byte 0x{raw[exc.start]:02x} at column "
                                         f"{exc.start + 1}); save the file as UTF-8")
                    continue
                yield lineno, text.rstrip("\r\n") + end, None
        else:
            # UTF-16/32 and old-Mac CR line ends: let the text layer split lines
            text_fh = io.TextIOWrapper(fh, encoding=src.encoding, errors="replace", newline=None)
            lineno = 0
            while (text := text_fh.readline(limit + 1)) and lineno != src.max_lines:
                lineno += 1
                if lineno % 1024 == 0:
                    src.bytes_read = fh.tell()
                if len(text) > limit and not text.endswith("\n"):
                    while (rest := text_fh.readline(1 << 20)) and not rest.endswith("\n"):
                        pass
                    yield lineno, None, f"the line is longer than {limit // 2**20} MB (the limit per line)"
                    continue
                yield lineno, text.rstrip("\r\n") + end, None


def head_text(path: Path, name: str, size: int = 64 * 1024) -> tuple[str, str]:
    """The decoded start of a file (for detection) and its encoding."""
    check_size(path, name)
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    encoding = sniff_encoding(head, name)
    text = head[: size * 4].decode(encoding, errors="replace")[:size]
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f")
    if control > max(3, len(text) // 20):
        raise DataError("this looks like a binary file, not a text export. "
                        "Export the conversations as JSONL, CSV or plain text.", name)
    return text.lstrip("\ufeff"), encoding


# -- JSON containers --------------------------------------------------------------------------------


def _loads(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"


def jsonl_records(src: Source) -> Iterator[tuple[int, Any, str | None]]:
    """(line, value, problem) for every non-blank line of a JSONL file."""
    for lineno, text, problem in lines(src):
        if problem is None and text is not None and not text.strip():
            continue
        src.rows_read += 1
        if problem is not None:
            yield lineno, None, problem
            continue
        value, problem = _loads(text)  # type: ignore[arg-type]
        yield lineno, value, problem


_WS = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()


def json_records(src: Source) -> Iterator[tuple[int, Any, str | None]]:
    """(line, value, problem) for every element of a JSON array, read element by element.

    A single top-level object is one record, or, when it only wraps a list ({"data": [...]}), that list.
    After a broken element, reading resumes at the next line that opens an element at the same indent.
    """
    reader = _JsonArrayReader(src)
    yield from reader.records()


class _JsonArrayReader:
    """A growing text buffer over `lines()` with line bookkeeping; the json module decodes elements."""

    def __init__(self, src: Source):
        self.src = src
        self.source = lines(src, keep_ends=True)
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.mark, self.mark_line = 0, 1  # buf[mark] is on line mark_line

    def more(self, min_chars: int) -> bool:
        got = 0
        for lineno, text, problem in self.source:
            if problem is not None:
                text = "\n"  # keeps line numbers right; the element around it fails to parse and is reported
                self.src.notes.append(f"line {lineno}: {problem}")
            self.buf += text  # type: ignore[operator]
            got += len(text)  # type: ignore[arg-type]
            if got >= min_chars:
                return True
        self.eof = True
        return got > 0

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or self.eof or not self.more(1 << 16):
                return

    def line_at(self, index: int) -> int:
        if index >= self.mark:
            self.mark_line += self.buf.count("\n", self.mark, index)
            self.mark = index
            return self.mark_line
        return self.mark_line - self.buf.count("\n", index, self.mark)

    def compact(self) -> None:
        if self.pos > 1 << 16:
            self.line_at(self.pos)
            self.buf = self.buf[self.pos:]
            self.mark -= self.pos
            self.pos = 0

    def records(self) -> Iterator[tuple[int, Any, str | None]]:
        src = self.src
        self.skip_ws()
        if self.pos >= len(self.buf):
            return
        if self.buf[self.pos] == "{":
            yield from self.document()
            return
        if self.buf[self.pos] != "[":
            src.rows_read += 1
            yield self.line_at(self.pos), None, "invalid JSON: expected '[' (a list of conversations) or '{'"
            return
        self.pos += 1
        while True:
            self.skip_ws()
            if self.pos >= len(self.buf):
                src.rows_read += 1
                yield self.line_at(self.pos), None, "invalid JSON: the file ends before the closing ']' (truncated?)"
                return
            if self.buf[self.pos] == "]":
                return
            if self.buf[self.pos] == ",":
                self.pos += 1
                continue
            start = self.pos
            start_line = self.line_at(start)
            value, problem, fatal = self.element()
            src.rows_read += 1
            yield start_line, value, problem
            if fatal or (problem is not None and not self.resync(start)):
                return
            self.compact()

    def element(self) -> tuple[Any, str | None, bool]:
        """(value, problem, fatal) for the element at pos; fatal means the rest cannot be read."""
        while True:
            try:
                value, self.pos = _DECODER.raw_decode(self.buf, self.pos)
                return value, None, False
            except RecursionError:
                return None, "invalid JSON: nested too deeply", False
            except json.JSONDecodeError as exc:
                # lines arrive whole and JSON tokens never span lines, so only an error at the very end
                # of the buffer can mean "not read yet"
                if not self.buf[exc.pos:].strip() and not self.eof:
                    if len(self.buf) - self.pos > limits.MAX_LINE_BYTES:
                        return None, (f"a list element larger than {limits.MAX_LINE_BYTES // 2**20} MB; the rest "
                                      "of the file was not read. Export JSONL (one conversation a line) instead"), True
                    self.more(max(1 << 16, len(self.buf) - self.pos))
                    continue
                if not self.buf[exc.pos:].strip():
                    return None, "invalid JSON: the file ends inside this element (truncated?)", True
                return None, f"invalid JSON: {exc.msg} (line {self.line_at(exc.pos)}, column {exc.colno})", False

    def resync(self, start: int) -> bool:
        """Move to the next line that opens an element at the indent the broken one had."""
        line_start = self.buf.rfind("\n", 0, start) + 1
        indent = self.buf[line_start:start]
        if indent.strip(" \t"):
            pattern = re.compile(r"\n[ \t]*(?:,[ \t]*)?\{")
        else:
            pattern = re.compile(r"\n" + re.escape(indent) + r"(?:,[ \t]*)?\{")
        search_from = start + 1
        while True:
            m = pattern.search(self.buf, search_from)
            if m:
                self.pos = m.end() - 1
                return True
            if self.eof:
                return False
            search_from = max(search_from, len(self.buf) - len(indent) - 8)
            self.more(1 << 16)

    def document(self) -> Iterator[tuple[int, Any, str | None]]:
        """A file holding one JSON object: read it whole, within the per-record limit."""
        src = self.src
        line = self.line_at(self.pos)
        while self.more(1 << 20):
            if len(self.buf) > limits.MAX_LINE_BYTES:
                src.rows_read += 1
                yield line, None, (f"a single JSON object larger than {limits.MAX_LINE_BYTES // 2**20} MB; "
                                "export a JSON array or JSONL (one conversation a line) instead")
                return
        value, problem = _loads(self.buf)
        if isinstance(value, dict) and not {"messages", "conversations", "instruction"} & set(value):
            lists = [v for v in value.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
            if len(lists) == 1:  # a wrapper like {"data": [...]}
                for element in lists[0]:
                    src.rows_read += 1
                    yield line, element, None
                return
        src.rows_read += 1
        yield line, value, problem


# -- CSV ---------------------------------------------------------------------------------------------


def _csv_dialect(header_line: str, suffix: str) -> str:
    if suffix == ".tsv":
        return "\t"
    counts = {d: header_line.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def csv_records(src: Source) -> Iterator[tuple[int, Any, str | None]]:
    """(row start line, {column: value}, problem) for every data row of a CSV/TSV file with a header.

    Rows are read strictly: a malformed row (an unclosed quote would otherwise swallow the rest of
    the file into one field) is reported, and reading resumes on the line after the row's first line.
    """
    problems: list[tuple[int, str]] = []
    consumed: list[tuple[int, str]] = []  # the physical lines of the row being read
    pending: deque[tuple[int, str]] = deque()  # lines to read again after a malformed row

    def good_lines() -> Iterator[tuple[int, str]]:
        for lineno, text, problem in lines(src, keep_ends=True):
            if problem is not None:
                problems.append((lineno, problem))
                continue
            yield lineno, text  # type: ignore[misc]

    source = good_lines()

    def feed() -> Iterator[str]:
        while True:
            item = pending.popleft() if pending else next(source, None)
            if item is None:
                return
            consumed.append(item)
            yield item[1]

    first = next((item for item in source if item[1].strip()), None)
    if first is None:
        return
    delimiter = _csv_dialect(first[1], src.path.suffix.lower())
    pending.append(first)
    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(f"the CSV header cannot be read ({exc}).", src.name, first[0]) from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    csv.field_size_limit(max(csv.field_size_limit(), limits.MAX_LINE_BYTES))  # long messages are normal
    src.columns = header
    consumed.clear()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            start = consumed[0][0] if consumed else 0
            pending.extendleft(reversed(consumed[1:]))
            consumed.clear()
            reader = csv.reader(feed(), delimiter=delimiter, strict=True)
            src.rows_read += 1
            yield start, None, f"the CSV row cannot be read ({exc}); check its quotes"
            continue
        start = consumed[0][0] if consumed else 0
        consumed.clear()
        for lineno, problem in problems:
            src.rows_read += 1
            yield lineno, None, problem
        problems.clear()
        if not row or not any(cell.strip() for cell in row):
            continue
        src.rows_read += 1
        if len(row) > len(header):
            yield start, None, (f"the row has {len(row)} fields but the header has {len(header)}; "
                                "quote fields that contain the delimiter")
            continue
        yield start, dict(zip(header, row + [None] * (len(header) - len(row)), strict=True)), None  # type: ignore[list-item]
    for lineno, problem in problems:
        src.rows_read += 1
        yield lineno, None, problem


# -- columns: guesses from common names, or the user's mapping ---------------------------------------

COLUMN_GUESSES: dict[str, tuple[str, ...]] = {
    "conversation": ("conversation_id", "conversation", "conv_id", "ticket_id", "ticket", "thread_id", "thread",
                     "chat_id", "chat", "session_id", "session", "case_id", "case", "dialog_id", "dialogue_id",
                     "dialog", "dialogue", "interaction_id", "transcript_id"),
    "timestamp": ("timestamp", "time", "datetime", "date_time", "created_at", "created", "sent_at", "sent",
                  "date", "ts", "posted_at", "time_stamp"),
    "speaker": ("speaker", "role", "author", "sender", "from", "author_type", "sender_type", "user_type", "party",
                "who", "participant", "author_name", "sender_name", "name"),
    "text": ("text", "message", "content", "body", "value", "message_text", "comment", "msg", "utterance",
             "message_body", "public_comment"),
    "prompt": ("prompt", "question", "input", "query", "user", "customer", "request", "user_message",
               "customer_message", "question_text", "instruction"),
    "response": ("response", "answer", "output", "completion", "reply", "assistant", "agent", "bot",
                 "agent_reply", "assistant_message", "answer_text", "target"),
}
ROW_KINDS = {"messages": ("conversation", "speaker", "text"), "pairs": ("prompt", "response")}


def _norm_column(name: str) -> str:
    return re.sub(r"[\s\-.]+", "_", str(name).strip().lower())


def guess_columns(columns: Iterable[str], column_map: dict[str, str] | None = None) -> dict[str, str]:
    """{field: column} for the fields we can place, the user's mapping first, then common names."""
    columns = [c for c in columns if c is not None]
    by_norm = {_norm_column(c): c for c in columns}
    found: dict[str, str] = {}
    for key, column in (column_map or {}).items():
        if column in columns:
            found[key] = column
        elif _norm_column(column) in by_norm:
            found[key] = by_norm[_norm_column(column)]
    taken = set(found.values())
    for key, names in COLUMN_GUESSES.items():
        if key in found:
            continue
        for name in names:
            column = by_norm.get(name)
            if column is not None and column not in taken:
                found[key] = column
                taken.add(column)
                break
    return found


def _require_columns(src: Source, columns: Iterable[str], kind: str) -> dict[str, str]:
    columns = list(columns)
    for key, column in src.column_map.items():
        if column not in columns and _norm_column(column) not in {_norm_column(c) for c in columns}:
            raise DataError(f"there is no column '{column}' (mapped to {key}). Columns: {', '.join(columns)}.",
                            src.name)
    found = guess_columns(columns, src.column_map)
    missing = [k for k in ROW_KINDS[kind] if k not in found]
    if missing:
        hint = " ".join(f"--column {k}=NAME" for k in missing)
        raise DataError(f"cannot tell which column holds the {', '.join(missing)} (columns: {', '.join(columns)}). "
                        f"Name it: {hint}.", src.name)
    return found


# -- records -> conversations -------------------------------------------------------------------------


def _text(content: Any) -> str | None:
    """Plain text from a message content: a string, or a list of text parts (OpenAI); None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                return None
        return "\n".join(parts)
    return None


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null"}.get(type(value), type(value).__name__)


def _chat_record(value: Any, src: Source, line: int, key: str, role_key: str, text_key: str) -> Item:
    """OpenAI ({"messages": [{"role", "content"}]}) and ShareGPT ({"conversations": [{"from", "value"}]})."""
    if not isinstance(value, dict):
        return Dropped(src.name, line, NOT_OBJECT, f"expected a JSON object with '{key}', got {_type_name(value)}")
    messages = value.get(key)
    if messages is None and key == "conversations":
        messages = value.get("messages")
    if messages is None:
        return Dropped(src.name, line, NO_MESSAGES, f"no '{key}' list in this record (keys: {', '.join(map(str, value))})")
    if not isinstance(messages, list) or not messages:
        return Dropped(src.name, line, NO_MESSAGES, f"'{key}' is empty or not a list")
    out: list[dict[str, Any]] = []
    system = value.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            return Dropped(src.name, line, MISSING_FIELD, f"message {i} is {_type_name(msg)}, not an object")
        role = msg.get(role_key, msg.get("role"))
        has_text = text_key in msg or "content" in msg
        content = msg.get(text_key, msg.get("content"))
        if role is None or not has_text:
            missing = "role" if role is None else "content"
            return Dropped(src.name, line, MISSING_FIELD, f"message {i} has no '{role_key if missing == 'role' else text_key}'")
        if not isinstance(role, str):
            return Dropped(src.name, line, UNRECOGNIZED_ROLE, f"message {i} has a role that is not text ({role!r})")
        text = _text(content)
        if text is None or not text.strip():
            what = "empty" if text is not None or content is None or content == [] else f"{_type_name(content)}, not text"
            return Dropped(src.name, line, EMPTY_CONTENT, f"message {i} ({role}) content is {what}")
        item: dict[str, Any] = {"role": role, "content": text}
        if "weight" in msg:
            if msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
                return Dropped(src.name, line, UNPARSEABLE, f"message {i} weight must be 0 or 1, got {msg['weight']!r}")
            item["weight"] = int(msg["weight"])
        out.append(item)
    conv_id = value.get("id")
    return Conversation(out, src.name, line, line, strict_roles=True,
                        id=str(conv_id) if isinstance(conv_id, (str, int)) else None)


def openai_record(value: Any, src: Source, line: int) -> Item:
    return _chat_record(value, src, line, "messages", "role", "content")


def sharegpt_record(value: Any, src: Source, line: int) -> Item:
    return _chat_record(value, src, line, "conversations", "from", "value")


def alpaca_record(value: Any, src: Source, line: int) -> Item:
    """{"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]} -> user/assistant turns."""
    if not isinstance(value, dict):
        return Dropped(src.name, line, NOT_OBJECT, f"expected an object with instruction/output, got {_type_name(value)}")
    instruction, output = value.get("instruction"), value.get("output")
    if instruction is None or output is None:
        missing = "instruction" if instruction is None else "output"
        return Dropped(src.name, line, MISSING_FIELD, f"no '{missing}' in this record")
    extra = value.get("input") or ""
    if not all(isinstance(v, str) for v in (instruction, output, extra)):
        return Dropped(src.name, line, EMPTY_CONTENT, "instruction, input and output must be text")
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction
    if not prompt.strip() or not output.strip():
        return Dropped(src.name, line, EMPTY_CONTENT, f"the {'instruction' if not prompt.strip() else 'output'} is empty")
    messages: list[dict[str, Any]] = []
    if isinstance(value.get("system"), str) and value["system"].strip():
        messages.append({"role": "system", "content": value["system"]})
    history = value.get("history") or []
    if isinstance(history, str):
        history, _ = _loads(history)  # CSV cells hold it as JSON text
    for pair in history if isinstance(history, list) else []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) and p.strip() for p in pair):
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        else:
            return Dropped(src.name, line, EMPTY_CONTENT, "'history' must be a list of [question, answer] text pairs")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(messages, src.name, line, line, strict_roles=True)


def _pairs_record(columns: dict[str, str]) -> Callable[[Any, Source, int], Item]:
    def record(value: Any, src: Source, line: int) -> Item:
        if not isinstance(value, dict):
            return Dropped(src.name, line, NOT_OBJECT, f"expected an object with prompt and response, got {_type_name(value)}")
        prompt, response = value.get(columns["prompt"]), value.get(columns["response"])
        if prompt is None or response is None:
            missing = columns["prompt"] if prompt is None else columns["response"]
            return Dropped(src.name, line, MISSING_FIELD, f"no '{missing}' value")
        if not isinstance(prompt, str) or not isinstance(response, str):
            return Dropped(src.name, line, EMPTY_CONTENT, "prompt and response must be text")
        if not prompt.strip() or not response.strip():
            empty = columns["prompt"] if not prompt.strip() else columns["response"]
            return Dropped(src.name, line, EMPTY_CONTENT, f"'{empty}' is empty")
        return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                            src.name, line, line, strict_roles=True)

    return record


def _records_to_items(records: Iterator[tuple[int, Any, str | None]], src: Source,
                      convert: Callable[[Any, Source, int], Item]) -> Iterator[Item]:
    for line, value, problem in records:
        yield Dropped(src.name, line, UNPARSEABLE, problem) if problem else convert(value, src, line)


def _first_record(records: Iterator[tuple[int, Any, str | None]]) -> Any:
    for _line, value, problem in records:
        if problem is None:
            return value
    return None


def _with_columns(src: Source, reader: Callable[[Source], Iterator[tuple[int, Any, str | None]]],
                  kind: str) -> dict[str, str]:
    """Column names for a tabular shape, from the CSV header or the first object's keys."""
    if reader is csv_records:
        probe = Source(src.path, src.name, dict(src.column_map))
        first = _first_record(csv_records(probe))
        columns = probe.columns
        if first is None and not columns:
            raise DataError("the CSV file has no header row.", src.name)
    else:
        first = _first_record(reader(Source(src.path, src.name)))
        if not isinstance(first, dict):
            raise DataError("no JSON object found to read column names from.", src.name)
        columns = list(first)
    src.columns = list(columns)
    return _require_columns(src, columns, kind)


def _record_parser(reader: Callable[[Source], Iterator[tuple[int, Any, str | None]]],
                   convert: Callable[[Any, Source, int], Item]) -> Callable[[Source], Iterator[Item]]:
    def parse(src: Source) -> Iterator[Item]:
        return _records_to_items(reader(src), src, convert)

    return parse


def _pairs_parser(reader: Callable[[Source], Iterator[tuple[int, Any, str | None]]]) -> Callable[[Source], Iterator[Item]]:
    def parse(src: Source) -> Iterator[Item]:
        columns = _with_columns(src, reader, "pairs")
        return _records_to_items(reader(src), src, _pairs_record(columns))

    return parse


# -- one row per message (ticket / chat exports) ---------------------------------------------------------

_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M", "%d.%m.%Y %H:%M:%S",
                 "%d.%m.%Y %H:%M", "%H:%M:%S", "%H:%M", "%I:%M %p", "%I:%M:%S %p")


def time_key(value: Any) -> float | None:
    """A sortable number for a timestamp: epoch seconds, ISO 8601 or a few common layouts; None if unreadable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        stamp = None
        for layout in _TIME_FORMATS:
            try:
                stamp = datetime.strptime(text, layout)
                break
            except ValueError:
                continue
        if stamp is None:
            return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def _messages_parser(reader: Callable[[Source], Iterator[tuple[int, Any, str | None]]]) -> Callable[[Source], Iterator[Item]]:
    def parse(src: Source) -> Iterator[Item]:
        columns = _with_columns(src, reader, "messages")
        yield from _group_rows(src, reader(src), columns)

    return parse


def _group_rows(src: Source, records: Iterator[tuple[int, Any, str | None]], columns: dict[str, str]) -> Iterator[Item]:
    """Group message rows into conversations (first-seen order), sorted by timestamp within each.

    Rows are parked in a temporary sqlite file so a large export never sits in memory.
    """
    conv_col, speaker_col, text_col = columns["conversation"], columns["speaker"], columns["text"]
    ts_col = columns.get("timestamp")
    order: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tuner-rows-") as tmp:
        db = sqlite3.connect(Path(tmp) / "rows.db")
        db.execute("CREATE TABLE r (conv INTEGER, line INTEGER, ts REAL, has_ts INTEGER, speaker TEXT, text TEXT)")
        batch: list[tuple] = []
        for line, value, problem in records:
            if problem:
                yield Dropped(src.name, line, UNPARSEABLE, problem)
                continue
            if not isinstance(value, dict):
                yield Dropped(src.name, line, NOT_OBJECT, f"expected an object, got {_type_name(value)}")
                continue
            conv, speaker, text = value.get(conv_col), value.get(speaker_col), value.get(text_col)
            if conv is None or str(conv).strip() == "":
                yield Dropped(src.name, line, UNPARSEABLE, f"no conversation id in '{conv_col}'")
                continue
            if speaker is None or not str(speaker).strip() or text is None:
                missing = speaker_col if speaker is None or not str(speaker).strip() else text_col
                yield Dropped(src.name, line, MISSING_FIELD, f"no '{missing}' value in this row")
                continue
            if not isinstance(text, str) or not text.strip():
                yield Dropped(src.name, line, EMPTY_CONTENT,
                              f"'{text_col}' is {'empty' if isinstance(text, str) else _type_name(text) + ', not text'}")
                continue
            key = str(conv).strip()
            if key not in order:
                if len(order) >= limits.MAX_CONVERSATIONS:
                    yield Dropped(src.name, line, OVER_LIMIT, f"more than {limits.MAX_CONVERSATIONS} conversations "
                                  "in this file; this row's conversation was not read")
                    continue
                order[key] = len(order)
            stamp = time_key(value.get(ts_col)) if ts_col else None
            batch.append((order[key], line, stamp, stamp is not None, str(speaker).strip(), text))
            if len(batch) >= 5000:
                db.executemany("INSERT INTO r VALUES (?,?,?,?,?,?)", batch)
                batch.clear()
        db.executemany("INSERT INTO r VALUES (?,?,?,?,?,?)", batch)
        db.execute("CREATE INDEX r_conv ON r (conv, line)")
        ids = list(order)
        unordered = 0
        current: list[tuple] = []
        for row in db.execute("SELECT conv, line, ts, has_ts, speaker, text FROM r ORDER BY conv, line"):
            if current and row[0] != current[0][0]:
                conv, missing_time = _row_conversation(src, ids, current, ts_col)
                unordered += missing_time
                yield conv
                current = []
            current.append(row)
        if current:
            conv, missing_time = _row_conversation(src, ids, current, ts_col)
            unordered += missing_time
            yield conv
        db.close()
    if unordered:
        src.notes.append(f"{plural(unordered, 'conversation')} had missing or unreadable timestamps in '{ts_col}' "
                         f"and {agree(unordered, 'was')} kept in file order")


def _row_conversation(src: Source, ids: list[str], rows: list[tuple], ts_col: str | None) -> tuple[Conversation, bool]:
    timed = ts_col is not None and all(r[3] for r in rows)
    if timed:
        rows = sorted(rows, key=lambda r: (r[2], r[1]))  # ties keep file order
    messages = [{"role": r[4], "content": r[5]} for r in rows]
    lines_ = [r[1] for r in rows]
    conv = Conversation(messages, src.name, min(lines_), max(lines_), strict_roles=False, id=ids[rows[0][0]])
    return conv, ts_col is not None and not timed


# -- plain-text transcripts -----------------------------------------------------------------------------

_CLOCK = r"\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?(?:\s?[AaPp]\.?[Mm]\.?)?"
_DATE = r"(?:\d{4}-\d{2}-\d{2}|\d{1,2}[/.]\d{1,2}[/.]\d{2,4})"
_STAMP = rf"(?:{_DATE}(?:[ T,]+{_CLOCK}(?:Z|[+-]\d{{2}}:?\d{{2}})?)?|{_CLOCK})"
SPEAKER_LINE = re.compile(
    rf"^\s*(?:\[(?P<ts1>{_STAMP})\]|\((?P<ts2>{_STAMP})\)|(?P<ts3>{_STAMP}))?\s*(?:[-–|>]\s*)?"
    r"(?P<speaker>[^\W\d][\w .'&()#@/+-]{0,39}?)\s*:(?=\s|$|[^\d/])\s*(?P<text>.*?)\s*$"
)
_HEADER_WORDS = {"conversation", "chat", "ticket", "session", "transcript", "thread", "case", "dialog", "dialogue",
                 "call"}
_DECORATION = re.compile(r"^\s*[=\-#*~_]{3,}")
HEADER_LINE = re.compile(
    r"^\s*(?:[=\-#*~_]{3,}.*"
    r"|#{1,6}\s.*"
    r"|(?:conversation|chat|ticket|session|transcript|thread|case|dialog|dialogue|call)\s*(?:#|no\.?|id|number)?"
    r"\s*[:#]?\s*[\w-]*"
    r"|(?:conversation|chat|session|call|ticket)\s+(?:started|ended|began|start|end|opened|closed|log|transcript)\b.*"
    rf"|[\[(]?{_STAMP}[\])]?)\s*$",
    re.IGNORECASE,
)


def speaker_line(text: str) -> tuple[str, str] | None:
    """(speaker, text) when a transcript line starts a message, like `[10:02] Agent Rosa: Ahoy!`."""
    turn = _turn(text)
    return None if turn is None else turn[:2]


def _turn(text: str) -> tuple[str, str, bool] | None:
    """(speaker, text, timestamped) for a line shaped like a message start."""
    m = SPEAKER_LINE.match(text)
    if not m or len(m.group("speaker").split()) > 4:
        return None
    stamped = (m.group("ts1") or m.group("ts2") or m.group("ts3")) is not None
    return m.group("speaker").strip(), (m.group("text") or ""), stamped


def is_header(text: str) -> bool:
    """A line that starts a new conversation: `=== Ticket 12 ===`, `Conversation 3`, `Chat started: ...`."""
    if _DECORATION.match(text):
        return True
    if not HEADER_LINE.match(text):
        return False
    speaker = speaker_line(text)
    return speaker is None or speaker[0].split()[0].lower() in _HEADER_WORDS


MAX_LABELS = 10_000  # distinct `word:` labels counted while learning speakers (bounds memory on odd files)


@dataclass
class Speakers:
    """The speaker labels a transcript uses, learned from the whole file before parsing it.

    `timestamped`: turns carry a time, so an unstamped `word:` line is part of a message unless its label
    was seen stamped. Otherwise a label is a speaker when it is a known role or recurs with text after the
    colon; `else:`, `try:` or a one-off `Note:` inside a reply stay in the reply.
    """

    labels: set[str]
    timestamped: bool

    def starts_turn(self, speaker: str, stamped: bool) -> bool:
        if self.timestamped and stamped:
            return True
        return speaker in self.labels


def learn_speakers(src: Source) -> Speakers:
    """Which `word:` labels of a transcript are speakers, from counts over the file (read once, streamed).

    >>> # [10:02] Customer: ... / [10:03] Agent Maya: Try this: / else: / try:  ->  {Customer, Agent Maya}
    """
    counts: dict[str, list[int]] = {}  # label -> [lines, lines with text after the colon, stamped lines]
    scan = Source(src.path, src.name, max_lines=src.max_lines)
    for _lineno, text, problem in lines(scan):
        if problem is not None or text is None:
            continue
        turn = _turn(text)
        if turn is None or is_header(text):
            continue
        speaker, said, stamped = turn
        entry = counts.get(speaker)
        if entry is None:
            if len(counts) >= MAX_LABELS:
                continue
            entry = counts[speaker] = [0, 0, 0]
        entry[0] += 1
        entry[1] += bool(said.strip())
        entry[2] += stamped
    stamped_labels = {label for label, (_n, _t, s) in counts.items() if s}
    stamped_lines = sum(counts[label][2] for label in stamped_labels)
    if stamped_lines >= 2 and stamped_lines * 2 >= sum(counts[label][0] for label in stamped_labels):
        return Speakers(stamped_labels, timestamped=True)
    known = {label for label in counts if role_of(label) is not None}
    recurring = {label for label, (_n, t, _s) in counts.items() if t >= 2}
    if len(recurring) >= 2:  # the file shows who talks: one-off labels are words in a message
        return Speakers(recurring | known, timestamped=False)
    # too little to learn from (a short file): any label with text is a speaker, as written
    return Speakers(known | {label for label, (_n, t, _s) in counts.items() if t}, timestamped=False)


def parse_transcript(src: Source) -> Iterator[Item]:
    """`Speaker: text` lines; blank lines or header lines (`=== Ticket 12 ===`) separate conversations.

    Speakers are learned from the file first (`learn_speakers`); any other line, `else:` included,
    continues the message before it. When the file uses header lines, blank lines inside a conversation
    are kept as paragraph breaks; in a timestamped file so is a blank line not followed by a new turn.
    """
    text_head, _ = head_text(src.path, src.name)
    by_headers = any(line.strip() and is_header(line) for line in text_head.splitlines()[:2000])
    speakers = learn_speakers(src)
    messages: list[dict[str, Any]] = []
    start = end = 0
    blank_run = 0
    pending: dict[str, Any] | None = None  # the message being built (continuations append to it)

    def close_message() -> Iterator[Item]:
        nonlocal pending
        if pending is not None:
            if pending["content"].strip():
                messages.append({"role": pending["role"], "content": pending["content"].strip("\n")})
            else:
                yield Dropped(src.name, pending["line"], EMPTY_CONTENT, f"'{pending['role']}:' has no text")
        pending = None

    def close_conversation() -> Iterator[Item]:
        nonlocal messages
        yield from close_message()
        if messages:
            yield Conversation(messages, src.name, start, end, strict_roles=False)
        messages = []

    for lineno, text, problem in lines(src):
        if problem is not None:
            src.rows_read += 1
            yield Dropped(src.name, lineno, UNPARSEABLE, problem)
            continue
        assert text is not None
        if not text.strip():
            blank_run += 1
            if not by_headers and not speakers.timestamped:
                yield from close_conversation()
            continue
        src.rows_read += 1
        if is_header(text):
            yield from close_conversation()
            blank_run = 0
            continue
        turn = _turn(text)
        # a label nobody uses as a speaker still starts a message when there is none to continue
        if turn is not None and (pending is None or speakers.starts_turn(turn[0], turn[2])):
            if blank_run and not by_headers:
                yield from close_conversation()  # timestamped file: the blank line ended the conversation
            yield from close_message()
            if not messages:
                start = lineno
            pending = {"role": turn[0], "content": turn[1], "line": lineno}
        elif pending is not None:
            # code and quoted text keep their own layout: lines as written, blank lines counted
            body = text.rstrip()
            joiner = "\n" * (blank_run + 1) if blank_run and pending["content"] else "\n"
            pending["content"] = f"{pending['content']}{joiner}{body}" if pending["content"] else body.strip()
        else:
            yield Dropped(src.name, lineno, UNPARSEABLE,
                          "no 'Speaker: text' label and no message before it to continue; start messages with a "
                          "speaker name and a colon")
            blank_run = 0
            continue
        end = lineno
        blank_run = 0
    yield from close_conversation()


# -- the registry -------------------------------------------------------------------------------------------

PARSERS: dict[str, Callable[[Source], Iterator[Item]]] = {
    "openai-jsonl": _record_parser(jsonl_records, openai_record),
    "openai-json": _record_parser(json_records, openai_record),
    "sharegpt-json": _record_parser(json_records, sharegpt_record),
    "sharegpt-jsonl": _record_parser(jsonl_records, sharegpt_record),
    "alpaca-json": _record_parser(json_records, alpaca_record),
    "alpaca-jsonl": _record_parser(jsonl_records, alpaca_record),
    "alpaca-csv": _record_parser(csv_records, alpaca_record),
    "pairs-csv": _pairs_parser(csv_records),
    "pairs-jsonl": _pairs_parser(jsonl_records),
    "pairs-json": _pairs_parser(json_records),
    "messages-csv": _messages_parser(csv_records),
    "messages-jsonl": _messages_parser(jsonl_records),
    "messages-json": _messages_parser(json_records),
    "transcript-txt": parse_transcript,
}

FORMAT_HELP: dict[str, str] = {
    "openai-jsonl": 'OpenAI chat JSONL: {"messages": [{"role", "content", "weight"?}]} a line, optional "system"',
    "openai-json": "OpenAI chat records in one JSON array",
    "sharegpt-json": 'ShareGPT JSON array: {"conversations": [{"from": "human"|"gpt", "value"}]}',
    "sharegpt-jsonl": "ShareGPT records, one a line",
    "alpaca-json": "Alpaca JSON array: instruction, input, output (optional system, history)",
    "alpaca-jsonl": "Alpaca records, one a line",
    "alpaca-csv": "Alpaca CSV with instruction, input, output columns",
    "pairs-csv": "Prompt/response CSV (columns guessed or named with --column prompt=... response=...)",
    "pairs-jsonl": "Prompt/response JSONL (keys guessed or named)",
    "pairs-json": "Prompt/response JSON array",
    "messages-csv": "One row per message (ticket/chat export): conversation id, speaker, text, optional timestamp",
    "messages-jsonl": "One object per message, one a line: conversation id, speaker, text, optional timestamp",
    "messages-json": "One object per message in a JSON array",
    "transcript-txt": "Plain-text transcript: 'Speaker: text' lines, optional timestamps, blank or header lines between chats",
}
SHAPES = ("openai", "sharegpt", "alpaca", "pairs", "messages", "transcript")


def record_shape(value: Any, column_map: dict[str, str] | None = None) -> str | None:
    """Which shape one record (a JSON object or a CSV row as a dict) has, or None."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("messages"), list):
        inner = [m for m in value["messages"] if isinstance(m, dict)]
        return "sharegpt" if inner and "from" in inner[0] and "role" not in inner[0] else "openai"
    if isinstance(value.get("conversations"), list):
        return "sharegpt"
    keys = {_norm_column(k) for k in value}
    if {"instruction", "output"} <= keys and not column_map:
        return "alpaca"
    found = guess_columns(value, column_map)
    for kind in ("messages", "pairs"):
        if all(k in found for k in ROW_KINDS[kind]):
            return kind
    return None


def container(path: Path, head: str) -> str:
    """json, jsonl, csv or txt, from the first characters (and the file name for CSV)."""
    stripped = head.lstrip()
    if path.suffix.lower() in (".jsonl", ".ndjson") and stripped.startswith("{"):
        return "jsonl"
    first_line = stripped.split("\n", 1)[0]
    if stripped.startswith("[") and speaker_line(first_line) is None and not is_header(first_line):
        return "json"
    if stripped.startswith("{"):
        rows = [line for line in stripped.splitlines() if line.strip()]
        value, problem = _loads(rows[0])
        if problem is None and isinstance(value, dict):  # a whole object on line 1: JSONL, unless a lone .json one
            return "json" if path.suffix.lower() == ".json" and len(rows) == 1 else "jsonl"
        return "json"
    if path.suffix.lower() in CSV_SUFFIXES:
        return "csv"
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix.lower() == ".json":
        return "json"
    first = next((line for line in head.splitlines() if line.strip()), "")
    if speaker_line(first) is None and not is_header(first) and any(d in first for d in (",", ";", "\t")):
        header = [_norm_column(c) for c in next(csv.reader([first], delimiter=_csv_dialect(first, "")))]
        if len(guess_columns(header)) >= 2:
            return "csv"
    return "txt"


def detect_format(path: str | Path, column_map: dict[str, str] | None = None, name: str | None = None) -> str:
    """The registry name of a file's format, from its first bytes; DataError when it cannot tell."""
    path = Path(path)
    name = name or path.name
    head, _ = head_text(path, name)
    kind = container(path, head)
    if kind == "txt":
        sample = [line for line in head.splitlines()[:500] if line.strip()]
        if any(speaker_line(line) for line in sample):
            return "transcript-txt"
        raise DataError("cannot recognise the format: not JSON, JSONL or CSV, and no 'Speaker: text' lines. "
                        f"Choose one with --format ({', '.join(PARSERS)}).", name)
    src = Source(path, name, dict(column_map or {}))
    reader = {"json": json_records, "jsonl": jsonl_records, "csv": csv_records}[kind]
    first = None
    for _line, value, problem in reader(src):
        if problem is None:
            first = value
            break
        if src.rows_read > 50:
            break
    if kind == "csv" and first is None:
        first = dict.fromkeys(src.columns, "")
    shape = record_shape(first, column_map)
    if shape is None:
        keys = ", ".join(map(str, first)) if isinstance(first, dict) else _type_name(first)
        raise DataError(f"cannot recognise the records (found: {keys}). Name the columns with --column "
                        "(conversation/speaker/text or prompt/response) or pick --format "
                        f"({', '.join(PARSERS)}).", name)
    if shape in ("openai", "sharegpt") and kind == "csv":
        raise DataError("chat records need JSON or JSONL, not CSV.", name)
    return f"{shape}-{kind}"


def resolve_format(fmt: str, path: str | Path, column_map: dict[str, str] | None = None, name: str | None = None) -> str:
    """A registry name from 'auto', a full name ('messages-csv') or a shape ('messages', from the file's look)."""
    if fmt in (None, "", "auto"):
        return detect_format(path, column_map, name)
    if fmt in PARSERS:
        return fmt
    if fmt in SHAPES:
        path = Path(path)
        if fmt == "transcript":
            return "transcript-txt"
        head, _ = head_text(path, name or path.name)
        kind = container(path, head)
        kind = {"txt": "csv"}.get(kind, kind) if fmt in ("alpaca", "pairs", "messages") else kind
        candidate = f"{fmt}-{kind}"
        if candidate in PARSERS:
            return candidate
    from tuner.errors import TunerError

    raise TunerError(f"Unknown format '{fmt}'. Choose auto, one of {', '.join(SHAPES)}, or one of {', '.join(PARSERS)}.")


def parse(src: Source, fmt: str) -> Iterator[Item]:
    """Conversations and dropped records of one file, in file order."""
    return PARSERS[fmt](src)
