"""tuner.formats: every export shape parses, is detected, keeps line numbers, and survives bad bytes."""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner import formats, limits
from tuner.errors import DataError, TunerError
from tuner.formats import Conversation, Dropped, Source

HI, REPLY = "Hi, my kettle leaks", "Ahoy! We'll send a new one."


def _parse(path: Path, fmt: str | None = None, column_map: dict | None = None) -> tuple[list, Source]:
    fmt = fmt or formats.detect_format(path, column_map)
    src = Source(path, column_map=dict(column_map or {}))
    return list(formats.parse(src, fmt)), src


def _convs(items: list) -> list[list[tuple[str, str]]]:
    return [[(m["role"], m["content"]) for m in c.messages] for c in items if isinstance(c, Conversation)]


def _drops(items: list) -> list[tuple[int, str]]:
    return [(d.line, d.category) for d in items if isinstance(d, Dropped)]


# -- every format: detected, parsed, labels kept as written ------------------------------------------------

FORMAT_CASES = [
    ("openai.jsonl", "openai-jsonl",
     json.dumps({"messages": [{"role": "user", "content": HI}, {"role": "assistant", "content": REPLY}]}) + "\n",
     [[("user", HI), ("assistant", REPLY)]]),
    ("openai_system.jsonl", "openai-jsonl",
     json.dumps({"system": "Be brief.", "messages": [{"role": "user", "content": HI},
                                                    {"role": "assistant", "content": REPLY, "weight": 0}]}) + "\n",
     [[("system", "Be brief."), ("user", HI), ("assistant", REPLY)]]),
    ("openai_parts.jsonl", "openai-jsonl",
     json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": HI}]},
                              {"role": "assistant", "content": REPLY}]}) + "\n",
     [[("user", HI), ("assistant", REPLY)]]),
    ("openai.json", "openai-json",
     json.dumps([{"messages": [{"role": "user", "content": HI}, {"role": "assistant", "content": REPLY}]}], indent=2),
     [[("user", HI), ("assistant", REPLY)]]),
    ("share.json", "sharegpt-json",
     json.dumps([{"conversations": [{"from": "human", "value": HI}, {"from": "gpt", "value": REPLY}]}]),
     [[("human", HI), ("gpt", REPLY)]]),
    ("share.jsonl", "sharegpt-jsonl",
     json.dumps({"system": "S", "conversations": [{"from": "human", "value": HI}, {"from": "gpt", "value": REPLY}]}) + "\n",
     [[("system", "S"), ("human", HI), ("gpt", REPLY)]]),
    ("wrapped.json", "sharegpt-json",
     json.dumps({"data": [{"conversations": [{"from": "human", "value": HI}, {"from": "gpt", "value": REPLY}]}]}),
     [[("human", HI), ("gpt", REPLY)]]),
    ("alpaca.json", "alpaca-json",
     json.dumps([{"instruction": "Fix this:", "input": "kettle leaks", "output": REPLY}]),
     [[("user", "Fix this:\n\nkettle leaks"), ("assistant", REPLY)]]),
    ("alpaca.jsonl", "alpaca-jsonl",
     json.dumps({"instruction": HI, "output": REPLY, "history": [["Hello", "Ahoy!"]]}) + "\n",
     [[("user", "Hello"), ("assistant", "Ahoy!"), ("user", HI), ("assistant", REPLY)]]),
    ("alpaca.csv", "alpaca-csv", f'instruction,input,output\n"{HI}",,"{REPLY}"\n', [[("user", HI), ("assistant", REPLY)]]),
    ("qa.csv", "pairs-csv", f'question,answer\n"{HI}","{REPLY}"\n', [[("user", HI), ("assistant", REPLY)]]),
    ("pairs.jsonl", "pairs-jsonl", json.dumps({"prompt": HI, "completion": REPLY}) + "\n",
     [[("user", HI), ("assistant", REPLY)]]),
    ("pairs.json", "pairs-json", json.dumps([{"query": HI, "response": REPLY}]), [[("user", HI), ("assistant", REPLY)]]),
    ("tickets.csv", "messages-csv",
     f'ticket_id,created_at,author,body\n7,2025-03-02T10:05:00,Agent Rosa,"{REPLY}"\n7,2025-03-02T10:01:00,Customer,"{HI}"\n',
     [[("Customer", HI), ("Agent Rosa", REPLY)]]),
    ("tickets.tsv", "messages-csv", f"conversation_id\tspeaker\ttext\n1\tCustomer\t{HI}\n1\tAgent\t{REPLY}\n",
     [[("Customer", HI), ("Agent", REPLY)]]),
    ("semicolon.csv", "messages-csv", f"chat_id;sender;message\n1;Customer;{HI}\n1;Agent;{REPLY}\n",
     [[("Customer", HI), ("Agent", REPLY)]]),
    ("rows.jsonl", "messages-jsonl",
     json.dumps({"conversation_id": "a", "timestamp": 2, "role": "agent", "content": REPLY}) + "\n"
     + json.dumps({"conversation_id": "a", "timestamp": 1, "role": "customer", "content": HI}) + "\n",
     [[("customer", HI), ("agent", REPLY)]]),
    ("chat.txt", "transcript-txt", f"Customer: {HI}\nAgent: {REPLY}\n", [[("Customer", HI), ("Agent", REPLY)]]),
    ("stamps.txt", "transcript-txt",
     f"[10:02] Customer: {HI}\n10:02:13 Agent Rosa: {REPLY}\n\n2025-03-02 10:02 Customer: again\n(10:03) Agent: sure\n",
     [[("Customer", HI), ("Agent Rosa", REPLY)], [("Customer", "again"), ("Agent", "sure")]]),
    ("headers.log", "transcript-txt",
     f"=== Ticket 1 ===\nCustomer: {HI}\n\nstill leaking\nAgent: {REPLY}\nConversation 2\nCustomer: x\nAgent: y\n",
     [[("Customer", f"{HI}\n\nstill leaking"), ("Agent", REPLY)], [("Customer", "x"), ("Agent", "y")]]),
]


@pytest.mark.parametrize("name,fmt,text,expected", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_each_format_is_detected_and_parsed(tmp_path, name, fmt, text, expected):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert formats.detect_format(path) == fmt
    items, src = _parse(path)
    assert _convs(items) == expected
    assert _drops(items) == []
    assert src.rows_read >= 1


def test_openai_weight_is_kept(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b", "weight": 0}]}) + "\n")
    conv = _parse(path)[0][0]
    assert conv.messages[1] == {"role": "assistant", "content": "b", "weight": 0}


def test_user_named_columns_override_guesses(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("thread,who,said,notes\n1,Customer,hello,x\n1,Agent,ahoy,y\n")
    with pytest.raises(DataError, match="--column"):
        formats.detect_format(path)  # 'said' is not a known text column name
    items, _ = _parse(path, "messages-csv", {"text": "said", "speaker": "who", "conversation": "thread"})
    assert _convs(items) == [[("Customer", "hello"), ("Agent", "ahoy")]]
    with pytest.raises(DataError, match="no column 'nope'"):
        _parse(path, "messages-csv", {"text": "nope"})


def test_shape_names_resolve_by_file_kind(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,response\na,b\n")
    assert formats.resolve_format("pairs", path) == "pairs-csv"
    assert formats.resolve_format("pairs-csv", path) == "pairs-csv"
    with pytest.raises(TunerError, match="Unknown format"):
        formats.resolve_format("xml", path)


# -- bad records: category and 1-based line --------------------------------------------------------------

def _jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD_JSONL = [
    ("{not json", formats.UNPARSEABLE),
    ("[1, 2]", formats.NOT_OBJECT),
    ({"text": "no messages key"}, formats.NO_MESSAGES),
    ({"messages": []}, formats.NO_MESSAGES),
    ({"messages": [{"content": "no role"}]}, formats.MISSING_FIELD),
    ({"messages": [{"role": "user"}]}, formats.MISSING_FIELD),
    ({"messages": [{"role": "user", "content": "   "}]}, formats.EMPTY_CONTENT),
    ({"messages": [{"role": "user", "content": {"image": "x.png"}}]}, formats.EMPTY_CONTENT),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, formats.EMPTY_CONTENT),
    ({"messages": [{"role": "user", "content": "q", "weight": 3}]}, formats.UNPARSEABLE),
    ("[" * 100_000 + "]" * 100_000, formats.UNPARSEABLE),  # nested too deeply for the json module
]


@pytest.mark.parametrize("record,category", BAD_JSONL, ids=[str(c[1]) + str(i) for i, c in enumerate(BAD_JSONL)])
def test_bad_jsonl_line_is_reported_with_its_line_and_the_rest_is_kept(tmp_path, record, category):
    path = tmp_path / "chats.jsonl"
    path.write_text(_jsonl(GOOD, "", record, GOOD))  # line 2 is blank, the bad record is on line 3
    items, src = _parse(path, "openai-jsonl")
    assert _drops(items) == [(3, category)]
    assert [c.line for c in items if isinstance(c, Conversation)] == [1, 4]
    assert src.rows_read == 3
    assert all(d.file == "chats.jsonl" and d.reason for d in items if isinstance(d, Dropped))


def test_json_array_recovers_after_a_broken_element(tmp_path):
    good = json.dumps(GOOD)
    text = f"[\n  {good},\n  {{\"messages\": [{{\"role\": \"user\" \"content\": \"x\"}}]}},\n  {good},\n  7\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text)
    items, _ = _parse(path, "openai-json")
    assert [(c.line) for c in items if isinstance(c, Conversation)] == [2, 4]
    assert _drops(items) == [(3, formats.UNPARSEABLE), (5, formats.NOT_OBJECT)]


def test_json_array_pretty_printed_elements_keep_their_start_line(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps([GOOD, GOOD, GOOD], indent=2))
    items, _ = _parse(path)
    starts = [c.line for c in items]
    lines = path.read_text().splitlines()
    assert len(starts) == 3 and all(lines[n - 1].strip() == "{" for n in starts)


def test_truncated_json_array_keeps_the_complete_elements(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text("[" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:30])
    items, _ = _parse(path, "openai-json")
    assert len(_convs(items)) == 1
    assert _drops(items) == [(2, formats.UNPARSEABLE)]
    assert "truncated" in items[1].reason


def test_csv_row_problems_are_reported_per_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("conversation_id,speaker,text\n"
                    "1,Customer,hello\n"      # 2
                    "1,Agent,\"multi\nline\"\n"  # 3-4
                    "2,Customer\n"            # 5: missing text cell
                    "2,Customer,a,b\n"        # 6: extra field
                    ",Agent,orphan\n"         # 7: no conversation id
                    "3,,who said this\n"      # 8: no speaker
                    "3,Agent,   \n")          # 9: empty text
    items, src = _parse(path)
    assert _convs(items) == [[("Customer", "hello"), ("Agent", "multi\nline")]]
    assert _drops(items) == [(5, formats.MISSING_FIELD), (6, formats.UNPARSEABLE), (7, formats.UNPARSEABLE),
                             (8, formats.MISSING_FIELD), (9, formats.EMPTY_CONTENT)]
    assert src.rows_read == 7


def test_unclosed_quote_loses_only_its_own_row(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('conversation_id,speaker,text\n1,Customer,"oops\n1,Agent,fine\n2,Customer,"a"b\n'
                    '2,Agent,"multi\nline"\n3,Customer,"never closed\n')
    items, src = _parse(path, "messages-csv")
    assert _drops(items) == [(2, formats.UNPARSEABLE), (4, formats.UNPARSEABLE), (7, formats.UNPARSEABLE)]
    assert "quotes" in items[0].reason
    assert _convs(items) == [[("Agent", "fine")], [("Agent", "multi\nline")]]
    assert src.rows_read == 5


def test_rows_are_regrouped_and_sorted_by_timestamp(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("ticket,time,author,body\n"
                    "B,2025-03-02 10:05,Agent,b2\n"
                    "A,2025-03-02T10:00:00Z,Customer,a1\n"
                    "B,2025-03-02 10:01,Customer,b1\n"
                    "A,2025-03-02T10:00:30+00:00,Agent,a2\n"
                    "C,whenever,Customer,c1\n"
                    "C,,Agent,c2\n")
    items, src = _parse(path)
    assert [(c.id, [m["content"] for m in c.messages], c.line) for c in items] == [
        ("B", ["b1", "b2"], 2), ("A", ["a1", "a2"], 3), ("C", ["c1", "c2"], 6)]
    assert any("file order" in note for note in src.notes)  # C had unreadable times: kept in file order


@pytest.mark.parametrize("value,expected", [
    ("2025-03-02T10:00:00Z", 1740909600.0), ("2025-03-02 10:00", 1740909600.0), ("2025-03-02T11:00:00+01:00", 1740909600.0),
    (1740909600, 1740909600.0), ("1740909600", 1740909600.0), ("soon", None), ("", None), (None, None),
])
def test_time_key(value, expected):
    assert formats.time_key(value) == expected


def test_time_of_day_sorts():
    assert formats.time_key("10:03") - formats.time_key("10:02") == 60
    assert formats.time_key("9:59 PM") > formats.time_key("10:02")


# -- transcripts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ("Customer: hi", ("Customer", "hi")),
    ("[10:02] Agent Rosa: Ahoy: welcome", ("Agent Rosa", "Ahoy: welcome")),
    ("2025-03-02 10:02:13 Kettle & Co.: hi", ("Kettle & Co.", "hi")),
    ("10:02 - Client: hi", ("Client", "hi")),
    ("Agent:", ("Agent", "")),
    ("see https://example.com/help", None),
    ("we open at 10:30 tomorrow", None),
    ("just a sentence", None),
    ("A very long speaker name with many words: hi", None),
])
def test_speaker_lines(line, expected):
    assert formats.speaker_line(line) == expected


@pytest.mark.parametrize("line,expected", [
    ("=== Ticket 12 ===", True), ("--- 2025-03-02 ---", True), ("Conversation 3", True), ("Ticket #4411", True),
    ("Chat started: 2025-03-02 10:00", True), ("# Session abc", True), ("[2025-03-02 10:00]", True),
    ("Ticket: 4411", True), ("Customer: hello", False), ("Chat Bot: hello there", False), ("hello", False),
])
def test_header_lines(line, expected):
    assert formats.is_header(line) is expected


def test_transcript_line_without_speaker_and_nothing_to_continue_is_reported(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Customer: hi\nAgent: ahoy\n\norphan line\nCustomer: again\nAgent:\nAgent: yes\n")
    items, _ = _parse(path)
    assert _drops(items) == [(4, formats.UNPARSEABLE), (6, formats.EMPTY_CONTENT)]
    assert _convs(items) == [[("Customer", "hi"), ("Agent", "ahoy")], [("Customer", "again"), ("Agent", "yes")]]
    assert [(c.line, c.end_line) for c in items if isinstance(c, Conversation)] == [(1, 2), (5, 7)]


# speaker learning: which `word:` lines start a turn and which belong to the message before them
CODE = "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    else:\n        return arr\ntry:"
SPEAKER_CASES = [
    ("timestamped, code in a reply",
     f"[10:00] Customer: sort?\n[10:01] Agent Maya: Here:\n{CODE}\n[10:02] Customer: thanks\n[10:03] Agent Maya: bye\n",
     [[("Customer", "sort?"), ("Agent Maya", f"Here:\n{CODE}"), ("Customer", "thanks"), ("Agent Maya", "bye")]]),
    ("timestamped, blank line inside code, blank line before the next chat",
     "[10:00] Customer: a\n[10:01] Agent Maya: x = 1\n\nelse:\n\n[11:00] Customer: b\n[11:01] Agent Maya: c\n",
     [[("Customer", "a"), ("Agent Maya", "x = 1\n\nelse:")], [("Customer", "b"), ("Agent Maya", "c")]]),
    ("timestamped, a learned speaker once without a stamp",
     "[10:00] Customer: a\n[10:01] Agent: b\nCustomer: c\n[10:03] Agent: d\n",
     [[("Customer", "a"), ("Agent", "b"), ("Customer", "c"), ("Agent", "d")]]),
    ("timestamped, a third speaker with a stamp",
     "[10:00] Customer: a\n[10:01] Agent: b\n[10:02] Supervisor: approved\n[10:03] Customer: c\n[10:04] Agent: d\n",
     [[("Customer", "a"), ("Agent", "b"), ("Supervisor", "approved"), ("Customer", "c"), ("Agent", "d")]]),
    ("untimestamped, code in a reply",
     f"Customer: sort?\nAgent: Here:\n{CODE}\nCustomer: thanks\nAgent: bye\n",
     [[("Customer", "sort?"), ("Agent", f"Here:\n{CODE}"), ("Customer", "thanks"), ("Agent", "bye")]]),
    ("untimestamped, a real third speaker who recurs",
     "Customer: a\nMaya: b\nSupervisor: approved\nCustomer: c\nSupervisor: noted\nMaya: d\n",
     [[("Customer", "a"), ("Maya", "b"), ("Supervisor", "approved"), ("Customer", "c"), ("Supervisor", "noted"),
       ("Maya", "d")]]),
    ("untimestamped, a one-off Note: line",
     "Customer: a\nAgent: b\nNote: keep the receipt\nCustomer: c\nAgent: d\n",
     [[("Customer", "a"), ("Agent", "b\nNote: keep the receipt"), ("Customer", "c"), ("Agent", "d")]]),
    ("untimestamped, too short to learn from: every label with text speaks",
     "Maya: hi\nKettle & Co.: Ahoy!\n", [[("Maya", "hi"), ("Kettle & Co.", "Ahoy!")]]),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in SPEAKER_CASES], ids=[c[0] for c in SPEAKER_CASES])
def test_speakers_are_learned_from_the_file(tmp_path, text, expected):
    path = tmp_path / "chat.txt"
    path.write_text(text, encoding="utf-8")
    assert formats.detect_format(path) == "transcript-txt"
    items, _ = _parse(path)
    assert _convs(items) == expected
    assert _drops(items) == []


def test_learned_speakers_of_a_timestamped_file_with_code():
    src = Source(Path(__file__).parent / "data" / "transcript_with_code.txt")
    speakers = formats.learn_speakers(src)
    assert speakers.timestamped and speakers.labels == {"Customer", "Agent Maya"}


# -- encodings and odd bytes --------------------------------------------------------------------------------

TEXT = "Customer: Привет, 你好, ça va? 🙂\nAgent: Ahoy! Ναι, مرحبا\n"
EXPECTED = [[("Customer", "Привет, 你好, ça va? 🙂"), ("Agent", "Ahoy! Ναι, مرحبا")]]


@pytest.mark.parametrize("encode", [
    lambda t: t.encode("utf-8"),
    lambda t: codecs.BOM_UTF8 + t.encode("utf-8"),
    lambda t: t.encode("utf-16"),  # with BOM
    lambda t: t.encode("utf-16-le"),  # without BOM
    lambda t: t.encode("utf-16-be"),
    lambda t: t.encode("utf-32"),
    lambda t: t.replace("\n", "\r\n").encode("utf-8"),
    lambda t: t.replace("\n", "\r").encode("utf-8"),  # old Mac line ends
], ids=["utf8", "utf8-bom", "utf16", "utf16le", "utf16be", "utf32", "crlf", "cr"])
def test_encodings_and_line_ends(tmp_path, encode):
    path = tmp_path / "chat.txt"
    path.write_bytes(encode(TEXT))
    items, _ = _parse(path)
    assert _convs(items) == EXPECTED


def test_legacy_code_page_is_decoded(tmp_path):
    path = tmp_path / "latin.csv"
    text = "conversation_id,speaker,text\n" + "".join(
        f"{i},Customer,\"Où est ma théière numéro {i}? Ça fait une semaine, merci d'avance.\"\n"
        f"{i},Agent,\"Bonjour ! Votre théière arrive demain, désolé pour l'attente.\"\n" for i in range(20))
    path.write_bytes(text.encode("cp1252"))
    items, src = _parse(path)
    assert len(_convs(items)) == 20
    assert _convs(items)[0][0] == ("Customer", "Où est ma théière numéro 0? Ça fait une semaine, merci d'avance.")


def test_invalid_utf8_line_is_reported_and_the_others_kept(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Où est ma théière ?"},
                                    {"role": "assistant", "content": "Ahoy, ça arrive !"}]}, ensure_ascii=False).encode()
    path.write_bytes(good + b"\n" + b'{"messages": "\xff\xfe broken"}\n' + good + b"\n")
    items, _ = _parse(path, "openai-jsonl")
    assert _drops(items) == [(2, formats.UNPARSEABLE)]
    assert "UTF-8" in items[1].reason
    assert len(_convs(items)) == 2


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (bytes(range(256)) * 20, "binary"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), "binary"),
    (b"just some words\nwithout any structure\n", "cannot recognise"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(100), "zip archive"),
    (b"\x1f\x8b\x08\x00" + bytes(100), "gzip"),
])
def test_unreadable_files_raise_a_clear_error(tmp_path, content, message):
    path = tmp_path / "upload.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as exc:
        formats.detect_format(path)
    assert "upload.jsonl" in str(exc.value)


def test_overlong_line_is_skipped_without_losing_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "a"}]}
    path.write_text(_jsonl(GOOD, big, GOOD))
    items, _ = _parse(path, "openai-jsonl")
    assert _drops(items) == [(2, formats.UNPARSEABLE)]
    assert "longer than" in items[1].reason
    assert [c.line for c in items if isinstance(c, Conversation)] == [1, 3]


def test_file_over_the_upload_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 100)
    path = tmp_path / "huge.jsonl"
    path.write_text(_jsonl(*[GOOD] * 5))
    with pytest.raises(DataError, match="limit is"):
        formats.detect_format(path)


def test_json_array_streams_with_bounded_buffer(tmp_path):
    """A large array is read element by element: the buffer stays far below the file size."""
    path = tmp_path / "many.json"
    with open(path, "w") as fh:
        fh.write("[\n")
        fh.write(",\n".join(json.dumps(GOOD) for _ in range(20_000)))
        fh.write("\n]\n")
    src = Source(path)
    reader = formats._JsonArrayReader(src)
    biggest = 0
    count = 0
    for _line, _value, problem in reader.records():
        assert problem is None
        count += 1
        biggest = max(biggest, len(reader.buf))
    assert count == 20_000
    assert biggest < path.stat().st_size / 5


# -- fuzzing: no crash, every input line accounted for --------------------------------------------------

_words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
                 max_size=30)
_transcript_line = st.one_of(
    st.builds(lambda s, t: f"{s}: {t}", st.sampled_from(["Customer", "Agent", "Agent Rosa", "Bob", "user"]), _words),
    st.builds(lambda ts, s, t: f"[{ts}] {s}: {t}", st.sampled_from(["10:02", "2025-03-02 10:02", "9:01:13"]),
              st.sampled_from(["Customer", "Agent"]), _words),
    st.sampled_from(["", "   ", "=== Ticket 9 ===", "Conversation 4", "-----"]),
    _words,
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accounted_lines(items: list) -> set[int]:
    covered: set[int] = set()
    for item in items:
        if isinstance(item, Conversation):
            covered.update(range(item.line, item.end_line + 1))
        else:
            covered.add(item.line)
    return covered


@FUZZ
@given(st.lists(_transcript_line, min_size=1, max_size=40))
def test_fuzz_transcripts_account_for_every_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            items, _ = _parse(path, "transcript-txt")
        except DataError:
            assert not "".join(lines).strip()  # only an empty file may be refused as a whole
            return
        covered = _accounted_lines(items)
        for number, line in enumerate(lines, 1):
            if line.strip() and not formats.is_header(line):
                assert number in covered, (number, line)
        for conv in items:
            if isinstance(conv, Conversation):
                assert conv.messages and all(m["content"].strip() for m in conv.messages)


_json_line = st.one_of(
    st.just(json.dumps(GOOD)),
    st.builds(lambda t: json.dumps({"messages": [{"role": "user", "content": t}]}), _words),
    st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.integers() | _words,
                                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_words, inner, max_size=3),
                                       max_leaves=8)),
    _words,
)


@FUZZ
@given(st.lists(_json_line, min_size=1, max_size=30))
def test_fuzz_jsonl_reports_every_record_once(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if not "".join(lines).strip():
            return
        items, src = _parse(path, "openai-jsonl")
        expected = [n for n, line in enumerate(lines, 1) if line.strip()]
        assert sorted(i.line for i in items) == expected  # one item per non-blank line, nothing lost or doubled
        assert src.rows_read == len(expected)


_cell = st.one_of(_words, st.sampled_from(["", "Customer", "Agent", "1", "2", '"', "a,b", "x\ny"]))


@FUZZ
@given(st.lists(st.lists(_cell, min_size=0, max_size=5), min_size=1, max_size=25))
def test_fuzz_message_csv_accounts_for_every_row(rows):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["conversation_id", "speaker", "text"])
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        path.write_text(buf.getvalue(), encoding="utf-8")
        items, src = _parse(path, "messages-csv")
        kept_rows = sum(len(c.messages) for c in items if isinstance(c, Conversation))
        dropped_rows = sum(1 for d in items if isinstance(d, Dropped))
        non_empty = sum(1 for r in rows if any(cell.strip() for cell in r))
        assert kept_rows + dropped_rows == non_empty == src.rows_read


_raw_csv_line = st.text(alphabet=st.sampled_from(list('ab1 ,";\t')), max_size=20)


@FUZZ
@given(st.lists(_raw_csv_line, min_size=0, max_size=25))
def test_fuzz_raw_csv_lines_never_crash_and_balance(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.csv"
        path.write_text("conversation_id,speaker,text\n" + "\n".join(lines) + "\n", encoding="utf-8")
        items, src = _parse(path, "messages-csv")
        kept_rows = sum(len(c.messages) for c in items if isinstance(c, Conversation))
        assert kept_rows + len(_drops(items)) == src.rows_read
        assert all(2 <= line <= len(lines) + 1 for line, _ in _drops(items))
        if not any('"' in line for line in lines):  # without quotes every non-blank line is its own row
            assert src.rows_read == sum(1 for line in lines if line.replace(",", "").strip())
