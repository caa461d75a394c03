"""tuner.dataset: exports -> train/validation chat examples + report.json, as a user would check them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuner import dataset, formats, limits
from tuner.config import ConvertConfig
from tuner.errors import DataError, TunerError
from tuner.formats import Conversation
from tuner.words import plural

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "datasets"
SAMPLE_FILES = ["kettle_openai.jsonl", "kettle_sharegpt.json", "kettle_tickets.csv", "kettle_transcripts.txt"]


def _examples(out: Path, split: str | None = None) -> list[dict]:
    splits = [split] if split else ["train", "validation"]
    return [json.loads(line) for s in splits for line in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]


def _tag(i: int) -> str:
    """A word unique to i (letters, so it survives the near-duplicate key, which ignores digits)."""
    word = ""
    for _ in range(3):
        i, r = divmod(i, 26)
        word += chr(97 + r)
    return word


def _chat(i: int, reply: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {_tag(i)} ({i}): where is my kettle?"},
                         {"role": "assistant", "content": reply or f"Ahoy! Kettle {_tag(i)} sails tomorrow."}]}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _convert(paths, out: Path, tokenizer, **settings) -> dict:
    settings.setdefault("min_examples", 1)
    return dataset.convert(paths, out, ConvertConfig(**settings), tokenizer=tokenizer)


# -- the samples: same conversations in any format -> same examples ------------------------------------------


@pytest.fixture(scope="module")
def sample_reports(tokenizer, tmp_path_factory):
    out = {}
    for name in SAMPLE_FILES:
        target = tmp_path_factory.mktemp(name.replace(".", "_"))
        out[name] = (dataset.convert([SAMPLES / name], target, ConvertConfig(max_length=512), tokenizer=tokenizer),
                     target)
    return out


def test_same_conversations_in_any_format_give_the_same_examples(sample_reports):
    reference_report, reference = sample_reports["kettle_openai.jsonl"]
    ref_train = sorted(json.dumps(e) for e in _examples(reference, "train"))
    ref_val = sorted(json.dumps(e) for e in _examples(reference, "validation"))
    assert reference_report["ok"] and len(ref_train) + len(ref_val) == 96
    for name, (report, out) in sample_reports.items():
        assert report["ok"], (name, report["reason"])
        assert report["dropped"] == [] and report["unmapped_speakers"] == []
        # the split hashes content, so each example even lands on the same side
        assert sorted(json.dumps(e) for e in _examples(out, "train")) == ref_train, name
        assert sorted(json.dumps(e) for e in _examples(out, "validation")) == ref_val, name
        assert report["stats"]["tokens"] == reference_report["stats"]["tokens"]
        assert report["pii"] == reference_report["pii"] == {"email": 3, "phone": 1, "card": 0, "iban": 0, "ip": 0}


def test_sample_voice_survives_conversion(sample_reports):
    report, out = sample_reports["kettle_tickets.csv"]
    assert report["files"][0]["format"] == "messages-csv"
    replies = [m["content"] for e in _examples(out) for m in e["messages"] if m["role"] == "assistant"]
    assert replies and all(r.startswith("Ahoy there, shipmate!") and r.endswith("The Kettle & Co. crew") for r in replies)
    assert report["stats"]["merged_messages"] == 6  # the six double customer openers
    assert report["stats"]["tokens"]["max"] <= 512
    assert not any("duplicate" in w or "near-copies" in w for w in report["warnings"])


def test_stats_are_measured_with_the_models_chat_template(sample_reports, tokenizer):
    report, out = sample_reports["kettle_openai.jsonl"]
    lengths = [len(tokenizer.apply_chat_template(e["messages"], tokenize=True, return_dict=True)["input_ids"])
               for e in _examples(out)]
    stats = report["stats"]["tokens"]
    assert (stats["min"], stats["max"], stats["total"]) == (min(lengths), max(lengths), sum(lengths))
    replies = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
               for e in _examples(out) for m in e["messages"] if m["role"] == "assistant"]
    assert report["stats"]["assistant_tokens"]["total"] == sum(replies)
    assert report["stats"]["turns"]["total"] == sum(len(e["messages"]) for e in _examples(out))
    assert report["stats"]["train_time_estimate"]["tokens_per_epoch"] > 0
    assert report["stats"]["tokenizer"] == "SmolLM2-135M-Instruct"
    assert report["elapsed_s"] >= 0


_chat_text = st.lists(st.sampled_from(list("ab ZÄ€🙂\n\t.,'-0123456789") + ["<|im_end|>", "<|im_start|>", "  ", "Ahoy"]),
                     max_size=30).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), _chat_text), min_size=1,
                         max_size=4), min_size=1, max_size=6))
def test_chats_are_rendered_and_counted_exactly_like_the_tokenizer(tokenizer, chats):
    # pieces between added tokens are counted once each; the sums must equal whole-text encoding
    convs = [[{"role": r, "content": c} for r, c in chat] for chat in chats]
    texts = tokenizer.apply_chat_template(convs, tokenize=False)
    renderer = dataset.Renderer(tokenizer)
    assert renderer.render(convs) == texts and renderer.render(convs[::-1]) == texts[::-1]  # checked, then direct
    assert renderer.direct is not None
    texts += [c for chat in chats for _, c in chat]
    counter = dataset.TokenCounter(tokenizer)
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count(texts) == expected
    assert counter.count(texts[::-1]) == expected[::-1]  # second call: from the cache
    assert counter.split is not None


def test_token_counter_falls_back_when_pieces_do_not_add_up(tokenizer):
    import re as regex

    counter = dataset.TokenCounter(tokenizer)
    counter.split = regex.compile("( )")  # cutting at spaces changes the count: the first call must notice
    texts = ["Ahoy there, shipmate! Your parcel sails today.", "hello world"]
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count(texts) == expected and counter.split is None
    assert counter.count(texts) == expected


# -- speakers -> roles, merging, trimming -----------------------------------------------------------------------

@pytest.mark.parametrize("label,strict,names,expected", [
    ("Agent", False, {}, "assistant"), ("support", False, {}, "assistant"), ("Agent Rosa", False, {}, "assistant"),
    ("Rosa (Support)", False, {}, "assistant"), ("BOT", False, {}, "assistant"), ("Rep", False, {}, "assistant"),
    ("Customer", False, {}, "user"), ("end-user", False, {}, "user"), ("Visitor 42", False, {}, "user"),
    ("Client", False, {}, "user"), ("system", False, {}, "system"),
    ("Customer Support", False, {}, "assistant"),  # a known label as a whole wins over its words
    ("Customer Agent", False, {}, None),  # both sides' words: ambiguous, the user decides
    ("Kettle & Co.", False, {}, None), ("Kettle & Co.", False, {"assistant_names": ["kettle & co"]}, "assistant"),
    ("Rosa", False, {"assistant_names": ["Rosa"]}, "assistant"), ("Bob", False, {"user_names": ["bob"]}, "user"),
    ("gpt", True, {}, "assistant"), ("human", True, {}, "user"), ("developer", True, {}, "system"),
    ("tool", True, {}, None), ("agent", True, {}, None), ("tool", True, {"assistant_names": ["tool"]}, "assistant"),
])
def test_role_of(label, strict, names, expected):
    assert dataset.role_of(label, strict, **names) == expected


def _conv(*pairs: tuple[str, str], strict: bool = False) -> Conversation:
    return Conversation([{"role": r, "content": c} for r, c in pairs], "f.txt", 7, 9, strict_roles=strict)


CLEAN_CASES = [
    ("merge one side", _conv(("Customer", "hi"), ("Customer", "my kettle"), ("Agent", "Ahoy"), ("Agent", "Bye")),
     [("user", "hi\nmy kettle"), ("assistant", "Ahoy\nBye")], {"merged_messages": 2}),
    ("trim greeting", _conv(("Agent", "Welcome aboard!"), ("Agent", "How can I help?"), ("Customer", "q"), ("Agent", "a")),
     [("user", "q"), ("assistant", "a")], {"trimmed_greetings": 1, "merged_messages": 1}),
    ("trim unanswered", _conv(("Customer", "q"), ("Agent", "a"), ("Customer", "thanks!")),
     [("user", "q"), ("assistant", "a")], {"trimmed_unanswered": 1}),
    ("system prompt added", _conv(("Customer", "q"), ("Agent", "a")),
     [("system", "BRIEF"), ("user", "q"), ("assistant", "a")], {"system_prompt_added": 1}),
    ("own system kept", _conv(("system", "Own brief"), ("Customer", "q"), ("Agent", "a")),
     [("system", "Own brief"), ("user", "q"), ("assistant", "a")], {}),
    ("whitespace and CRLF", _conv(("Customer", "  line1\r\nline2  "), ("Agent", "a\r\n")),
     [("user", "line1\nline2"), ("assistant", "a")], {}),
]


@pytest.mark.parametrize("name,conv,expected,counts", CLEAN_CASES, ids=[c[0] for c in CLEAN_CASES])
def test_clean(name, conv, expected, counts):
    tally = dataset._Counts()
    cfg = ConvertConfig(system_prompt="BRIEF" if name == "system prompt added" else "")
    out = dataset.clean(conv, cfg, tally)
    assert [(m["role"], m["content"]) for m in out] == expected
    assert {k: v for k, v in vars(tally).items() if v} == counts


@pytest.mark.parametrize("conv,category", [
    (_conv(("Customer", "q"), ("Wizard", "a")), formats.UNMAPPED_SPEAKER),
    (_conv(("user", "q"), ("tool", "a"), strict=True), formats.UNRECOGNIZED_ROLE),
    (_conv(("Customer", "q"), ("Customer", "anyone?")), formats.NO_ASSISTANT),
    (_conv(("Agent", "Hello! How can I help?")), formats.NO_ASSISTANT),
])
def test_clean_drops_with_category_and_line(conv, category):
    unmapped = __import__("collections").Counter()
    out = dataset.clean(conv, ConvertConfig(), dataset._Counts(), unmapped)
    assert isinstance(out, formats.Dropped)
    assert (out.file, out.line, out.category) == ("f.txt", 7, category)
    assert list(unmapped) == (["Wizard"] if category == formats.UNMAPPED_SPEAKER else [])


def test_drop_reasons_name_one_or_several_speakers_in_agreeing_words():
    one = dataset.clean(_conv(("Customer", "q"), ("Wizard", "a")), ConvertConfig(), hints="page")
    assert one.reason.startswith("speaker 'Wizard' is not a known agent or customer label; tick your team's")
    two = dataset.clean(_conv(("Priya", "q"), ("Dave", "a")), ConvertConfig())
    assert two.reason.startswith("speakers 'Priya' and 'Dave' are not known agent or customer labels; map each")
    roles = dataset.clean(_conv(("user", "q"), ("tool", "a"), ("function", "b"), strict=True), ConvertConfig())
    assert roles.reason.startswith("roles 'tool' and 'function' are not system, user or assistant")


def test_report_names_the_given_speakers_the_files_have(tmp_path, tokenizer):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"Priya: question {_tag(i)}?\nDave: answer {_tag(i)}.\n\n" for i in range(3)))
    report = _convert([log], tmp_path / "out", tokenizer, assistant_names=["dave", "Rosa"], user_names=["Ian"])
    assert report["named_speakers"] == ["dave"]  # as given (matched ignoring case); Rosa and Ian are not in it
    assert report["unmapped_speakers"] == ["Priya"]


def test_weights_survive_into_the_output(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "old", "weight": 0},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"new {i}", "weight": 1}]}
            for i in range(4)]
    _convert([_jsonl(tmp_path / "w.jsonl", rows)], tmp_path / "out", tokenizer, val_fraction=0)
    example = _examples(tmp_path / "out")[0]["messages"]
    assert [m.get("weight") for m in example] == [None, 0, None, 1]


# -- every drop category, end to end, with lines ------------------------------------------------------------------


def test_report_lists_every_drop_with_file_line_and_category(tmp_path, tokenizer):
    good = [_chat(i) for i in range(12)]
    records = good[:2] + [
        "{broken json",                                                          # 3
        "42",                                                                    # 4
        {"text": "hello"},                                                       # 5
        {"messages": [{"role": "user"}]},                                        # 6
        {"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "x"}]},  # 7
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},  # 8
        {"messages": [{"role": "user", "content": "anyone there?"}]},           # 9
        {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]},  # 10
    ] + good[2:]
    chats = _jsonl(tmp_path / "chats.jsonl", records)
    log = tmp_path / "log.txt"
    log.write_text("Customer: hi\nAgent: Ahoy!\n\nCustomer: hello\nWizard: poof\n\nno speaker here\n")
    report = _convert([chats, log], tmp_path / "out", tokenizer, max_length=128)
    got = [(d["file"], d["line"], d["category"]) for d in report["dropped"]]
    assert got == [
        ("chats.jsonl", 3, formats.UNPARSEABLE), ("chats.jsonl", 4, formats.NOT_OBJECT),
        ("chats.jsonl", 5, formats.NO_MESSAGES), ("chats.jsonl", 6, formats.MISSING_FIELD),
        ("chats.jsonl", 7, formats.UNRECOGNIZED_ROLE), ("chats.jsonl", 8, formats.EMPTY_CONTENT),
        ("chats.jsonl", 9, formats.NO_ASSISTANT), ("chats.jsonl", 10, formats.TOO_LONG),
        ("log.txt", 4, formats.UNMAPPED_SPEAKER), ("log.txt", 7, formats.UNPARSEABLE),
    ]
    assert all(isinstance(d["line"], int) and d["reason"] for d in report["dropped"])
    assert report["unmapped_speakers"] == ["Wizard"]
    assert any("Wizard" in w and "--assistant" in w for w in report["warnings"])
    files = {f["file"]: f for f in report["files"]}
    assert files["chats.jsonl"] | {"encoding": None} == {
        "file": "chats.jsonl", "format": "openai-jsonl", "encoding": None, "rows_read": 20,
        "conversations_read": 15, "conversations_kept": 12, "dropped": 8, "error": None,
        "row_unit": "lines", "rows_dropped": 5, "conversations_dropped": 3}
    assert files["log.txt"]["conversations_kept"] == 1
    assert report["train_examples"] + report["validation_examples"] == 13 == len(_examples(tmp_path / "out"))
    assert report["dropped_total"] == 10
    assert report["stats"]["dropped_by_category"][formats.TOO_LONG] == 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["dropped"] == report["dropped"]


def test_report_counts_one_unit_per_column_and_the_headline_sums_the_table(tmp_path, tokenizer):
    # 3 files: JSONL (a line per conversation), a one-row-per-message CSV, a transcript with a broken line
    chats = _jsonl(tmp_path / "chats.jsonl", [_chat(i) for i in range(30)] + ["{broken"])
    rows = "".join(f"{i},Customer,Question {_tag(100 + i)}?\n{i},Agent,Answer {_tag(100 + i)}.\n" for i in range(20))
    (tmp_path / "tickets.csv").write_text("conversation_id,speaker,text\n" + rows, encoding="utf-8")
    log = "".join(f"Customer: hi {_tag(200 + i)}\nAgent: ahoy {_tag(200 + i)}\n\n" for i in range(10))
    (tmp_path / "log.txt").write_text("orphan line\n\n" + log + "Customer: hello\nWizard: poof\n", encoding="utf-8")
    report = _convert([chats, tmp_path / "tickets.csv", tmp_path / "log.txt"], tmp_path / "out", tokenizer)
    files = {f["file"]: f for f in report["files"]}
    units = {name: (f["rows_read"], f["row_unit"], f["rows_dropped"], f["conversations_read"],
                    f["conversations_kept"], f["conversations_dropped"]) for name, f in files.items()}
    assert units == {"chats.jsonl": (31, "lines", 1, 30, 30, 0), "tickets.csv": (40, "rows", 0, 20, 20, 0),
                     "log.txt": (23, "lines", 1, 11, 10, 1)}
    totals = report["totals"]
    assert totals == {"conversations_read": 61, "conversations_kept": 60, "conversations_dropped": 1, "rows_dropped": 2,
                      "dropped": 3, "dropped_by_unit": {"lines": 2, "conversations": 1}}
    assert totals["conversations_read"] == report["stats"]["conversations_read"]
    assert totals["conversations_kept"] == report["train_examples"] + report["validation_examples"]
    assert totals["conversations_dropped"] + totals["rows_dropped"] == report["dropped_total"] == len(report["dropped"])
    assert totals["dropped"] == sum(totals["dropped_by_unit"].values()) == len(report["dropped"])
    summary = dataset.format_report(report)
    assert "from 61 conversations read" in summary.splitlines()[0]
    assert "tickets.csv [messages-csv]: 20 conversations read, 20 kept, 0 dropped; 40 rows read, 0 skipped" in summary


@pytest.mark.parametrize("hints", ["cli", "page"])
def test_advice_names_flags_only_for_the_command_line(tmp_path, tokenizer, hints):
    records = [_chat(i) for i in range(20)] + [
        {"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "x"}]},
        {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "mail ana@example.com"}, {"role": "assistant", "content": "ok"}]}]
    chats = _jsonl(tmp_path / "chats.jsonl", records)
    (tmp_path / "log.txt").write_text("Customer: hi\nAgent: Ahoy!\n\nCustomer: hello\nWizard: poof\n")
    report = dataset.convert([chats, tmp_path / "log.txt"], tmp_path / "out",
                             ConvertConfig(min_examples=1, max_length=128, overlong="drop"), tokenizer=tokenizer,
                             hints=hints)
    assert report["unmapped_speakers"] == ["Wizard"] and report["unmapped_speaker_conversations"] == {"Wizard": 1}
    advice = report["warnings"] + [d["reason"] for d in report["dropped"]]
    assert {d["category"] for d in report["dropped"]} == {formats.UNRECOGNIZED_ROLE, formats.TOO_LONG,
                                                           formats.UNMAPPED_SPEAKER}
    assert any("Personal data found" in w for w in report["warnings"])
    flagged = [a for a in advice if "--" in a]
    if hints == "cli":
        assert any("--assistant NAME" in a for a in flagged) and any("--max-length" in a for a in flagged)
        assert any("--redact-pii" in a for a in flagged)
    else:
        assert flagged == []
        assert any("Wizard" in w and "your team" in w for w in report["warnings"])
    with pytest.raises(TunerError, match="hints"):
        dataset.convert([chats], tmp_path / "out2", ConvertConfig(), tokenizer=tokenizer, hints="web")


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_policy(tmp_path, tokenizer, policy):
    long_chat = {"messages": []}
    for turn in range(6):
        long_chat["messages"] += [{"role": "user", "content": f"Question {turn}: " + " ".join(["tea"] * 15)},
                                  {"role": "assistant", "content": f"Answer {turn}: " + " ".join(["kettle"] * 15)}]
    rows = [_chat(i) for i in range(5)] + [long_chat]
    report = _convert([_jsonl(tmp_path / "c.jsonl", rows)], tmp_path / "out", tokenizer, max_length=160,
                      overlong=policy, val_fraction=0)
    assert report["stats"]["over_limit"] == 1
    examples = _examples(tmp_path / "out")
    if policy == "drop":
        assert len(examples) == 5 and report["stats"]["truncated"] == 0
        assert [d["category"] for d in report["dropped"]] == [formats.TOO_LONG]
        assert "1 example over 160 tokens was dropped." in report["warnings"]
    else:
        cut = next(e["messages"] for e in examples if len(e["messages"]) > 2)
        assert cut == long_chat["messages"][: len(cut)] and cut[-1]["role"] == "assistant"
        n = len(tokenizer.apply_chat_template(cut, tokenize=True, return_dict=True)["input_ids"])
        assert n <= 160 < len(tokenizer.apply_chat_template(long_chat["messages"][: len(cut) + 2], tokenize=True,
                                                              return_dict=True)["input_ids"])
        assert report["stats"]["truncated"] == 1 and report["dropped"] == []
        assert "1 example was over 160 tokens and lost its last turns." in report["warnings"]
    assert report["stats"]["tokens"]["max"] <= 160


# -- duplicates, split -----------------------------------------------------------------------------------------------


def test_duplicates_are_counted_and_kept_on_one_side(tmp_path, tokenizer):
    base = [_chat(i) for i in range(40)]
    # 10 exact copies, and 10 near copies that differ only in numbers, case and punctuation
    exact = [base[i] for i in range(10)]
    near = [{"messages": [{"role": m["role"], "content": m["content"].upper().replace("?", "!!").replace("1", "9")}
                          for m in base[i]["messages"]]} for i in range(10, 20)]
    path = _jsonl(tmp_path / "dups.jsonl", base + exact + near)
    report = _convert([path], tmp_path / "out", tokenizer, val_fraction=0.3, seed=1)
    assert report["stats"]["exact_duplicates"] == 10
    assert report["stats"]["near_duplicates"] == 10
    assert report["train_examples"] + report["validation_examples"] == 60  # kept: counted and warned, not dropped
    assert any(w.startswith("20 of 60 examples (33%) are duplicates or near-duplicates") for w in report["warnings"])
    val = {json.dumps(e) for e in _examples(tmp_path / "out", "validation")}
    for i in range(20):
        copy = exact[i] if i < 10 else near[i - 10]
        assert (json.dumps(base[i]) in val) == (json.dumps(copy) in val)


def test_split_is_seeded_and_stable_when_data_grows(tmp_path, tokenizer):
    rows = [_chat(i) for i in range(200)]
    a = _convert([_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "a", tokenizer, seed=3)
    b = _convert([_jsonl(tmp_path / "b.jsonl", rows)], tmp_path / "b", tokenizer, seed=3)
    assert _examples(tmp_path / "a", "validation") == _examples(tmp_path / "b", "validation")
    assert 8 <= a["validation_examples"] <= 35  # about 10% of 200
    _convert([_jsonl(tmp_path / "c.jsonl", rows + [_chat(i) for i in range(200, 300)])], tmp_path / "c", tokenizer, seed=3)
    grown_val = _examples(tmp_path / "c", "validation")
    assert all(e in grown_val for e in _examples(tmp_path / "a", "validation"))  # old examples never change side
    _convert([_jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "d", tokenizer, seed=4)
    assert _examples(tmp_path / "d", "validation") != _examples(tmp_path / "a", "validation")
    assert b["train_examples"] + b["validation_examples"] == 200


def test_small_datasets_still_get_a_validation_example(tmp_path, tokenizer):
    report = _convert([_jsonl(tmp_path / "s.jsonl", [_chat(i) for i in range(12)])], tmp_path / "out", tokenizer,
                      val_fraction=0.0001)  # the seeded split alone would put none there
    assert report["validation_examples"] >= 1 and report["train_examples"] >= 1
    assert report["validation_examples"] + report["train_examples"] == 12
    n = report["validation_examples"]
    moved = [w for w in report["warnings"] if w.startswith("The seeded split put no example in validation; ")]
    assert moved == [f"The seeded split put no example in validation; {plural(n, 'example')} "
                     f"{'was' if n == 1 else 'were'} moved there so both splits have data."]


# -- warnings and the trainable verdict -----------------------------------------------------------------------------


def test_too_few_examples_blocks_training_with_a_reason(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "few.jsonl", [_chat(i) for i in range(4)] + ["oops"] * 3)
    report = _convert([path], tmp_path / "out", tokenizer, min_examples=10)
    assert report["ok"] is False
    assert "only 4 usable examples; at least 10 are needed" in report["reason"]
    assert "unparseable" in report["reason"] and "few.jsonl line 5" in report["reason"]
    assert report["warnings"][0].startswith("Training is blocked")


def test_canned_reply_and_uneven_lengths_are_warned(tmp_path, tokenizer):
    canned = "Thank you for contacting us. Your request has been received and an agent will reply within 24 hours."
    rows = [_chat(i, canned if i % 2 else None) for i in range(40)]
    report = _convert([_jsonl(tmp_path / "c.jsonl", rows)], tmp_path / "out", tokenizer)
    assert any("near-copies of one reply" in w for w in report["warnings"])
    uneven = [_chat(i, "Ok." if i % 10 else "Here is everything: " + "details " * 300) for i in range(40)]
    report = _convert([_jsonl(tmp_path / "u.jsonl", uneven)], tmp_path / "out2", tokenizer, max_length=2048)
    assert any("very uneven" in w for w in report["warnings"])
    sentences = ["Your parcel left the harbour today.", "Descale it with vinegar once a month.",
                 "Returns are free for thirty days.", "The Sencha likes water at eighty degrees.",
                 "Gift cards arrive by e-mail within minutes.", "We ship to most of the world.",
                 "Flip the spout cap to silence the whistle.", "Your code works on orders over 25 euro."]
    varied = [_chat(i, f"Ahoy! {sentences[i % 8]} {sentences[(3 * i + 1) % 8]}") for i in range(40)]
    clean = _convert([_jsonl(tmp_path / "k.jsonl", varied)], tmp_path / "out3", tokenizer)
    assert not any("near-copies" in w or "uneven" in w for w in clean["warnings"])


# -- PII -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("redact", [False, True])
def test_pii_is_counted_and_optionally_redacted(tmp_path, tokenizer, redact):
    rows = [_chat(i) for i in range(10)] + [{"messages": [
        {"role": "user", "content": "I'm ana@example.com, card 4111 1111 1111 1111, from 10.0.0.7"},
        {"role": "assistant", "content": "Ahoy! We'll call +44 20 7946 0958; refund to DE89 3704 0044 0532 0130 00."}]}]
    report = _convert([_jsonl(tmp_path / "p.jsonl", rows)], tmp_path / "out", tokenizer, redact_pii=redact,
                      system_prompt="Reach the crew at crew@kettle.example", val_fraction=0)
    assert report["pii"] == {"email": 1, "phone": 1, "card": 1, "iban": 1, "ip": 1}
    assert report["pii_redacted"] is redact
    text = (tmp_path / "out" / "train.jsonl").read_text()
    if redact:
        assert "[EMAIL], card [CARD], from [IP]" in text and "call [PHONE]; refund to [IBAN]." in text
        assert "ana@example.com" not in text and "4111" not in text
    else:
        assert "ana@example.com" in text and any("--redact-pii" in w for w in report["warnings"])
    assert "crew@kettle.example" in text  # the user's own brief is not redacted


# -- limits and hostile files -------------------------------------------------------------------------------------


def test_too_many_files_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(limits, "MAX_FILES", 2)
    paths = [_jsonl(tmp_path / f"{i}.jsonl", [_chat(i)]) for i in range(3)]
    with pytest.raises(DataError, match="at most 2"):
        _convert(paths, tmp_path / "out", tokenizer)


def test_max_length_over_the_server_limit_is_refused(tmp_path, tokenizer):
    with pytest.raises(TunerError, match="server limit"):
        _convert([_jsonl(tmp_path / "a.jsonl", [_chat(1)])], tmp_path / "out", tokenizer,
                 max_length=limits.MAX_EXAMPLE_TOKENS + 1)


def test_conversation_limit_stops_reading_with_a_report(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CONVERSATIONS", 15)
    report = _convert([_jsonl(tmp_path / "a.jsonl", [_chat(i) for i in range(20)])], tmp_path / "out", tokenizer)
    assert report["train_examples"] + report["validation_examples"] == 15
    assert [(d["line"], d["category"]) for d in report["dropped"]] == [(16, formats.OVER_LIMIT)]


def test_hostile_uploads_are_reported_and_good_files_still_convert(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 6 * 2**20)
    good = _jsonl(tmp_path / "good.jsonl", [_chat(i) for i in range(12)])
    html = _jsonl(tmp_path / "html.jsonl", [{"messages": [
        {"role": "user", "content": "<script>alert('x')</script><img src=x onerror=alert(1)>"},
        {"role": "assistant", "content": "<b>Ahoy</b> &amp; welcome"}]}])
    files = {
        "binary.jsonl": os.urandom(4096),
        "empty.jsonl": b"",
        "truncated.json": b'[{"messages": [{"role": "user", "content": "q"}, {"role": "assis',
        "nested.json": b"[" * 50_000 + b"]" * 50_000,
        "bad_utf8.txt": "Customer: ça va? Привет, où est ma théière ?\nAgent: oui, ça arrive\n".encode()
        + b"Customer: \xff\xfe\xfd\nAgent: ok\n",
        "utf16.txt": "Customer: Привет\nAgent: Ahoy!\n".encode("utf-16"),
        "columns.csv": b"conversation_id,speaker,text\n1,Customer\n1,Agent,ahoy,extra\n2,Customer,hi\n2,Agent,ahoy\n",
        "huge_line.jsonl": json.dumps({"messages": [{"role": "user", "content": "x" * 5_000_000},
                                                    {"role": "assistant", "content": "ok"}]}).encode() + b"\n",
        "too_big.jsonl": b"{}\n" * (3 * 2**20),  # 9 MB, over the 6 MB limit set above
    }
    paths = [good, html]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    report = _convert(paths, tmp_path / "out", tokenizer, max_length=256, overlong="drop")
    by_file = {f["file"]: f for f in report["files"]}
    assert by_file["good.jsonl"]["conversations_kept"] == 12
    assert "binary" in by_file["binary.jsonl"]["error"]
    assert "empty" in by_file["empty.jsonl"]["error"]
    assert "limit is 6 MB" in by_file["too_big.jsonl"]["error"]
    assert by_file["truncated.json"]["dropped"] == 1 and by_file["nested.json"]["dropped"] == 1
    assert by_file["bad_utf8.txt"]["conversations_kept"] == 1 and by_file["bad_utf8.txt"]["dropped"] == 1
    assert ("bad_utf8.txt", 3, formats.UNPARSEABLE) in {(d["file"], d["line"], d["category"]) for d in report["dropped"]}
    assert by_file["utf16.txt"]["conversations_kept"] == 1 and by_file["utf16.txt"]["encoding"] == "utf-16"
    assert by_file["columns.csv"]["conversations_kept"] == 1 and by_file["columns.csv"]["dropped"] == 2
    assert by_file["huge_line.jsonl"]["dropped"] == 1  # read, measured, over max_length: dropped with a reason
    categories = {(d["file"], d["category"]) for d in report["dropped"]}
    assert ("huge_line.jsonl", formats.TOO_LONG) in categories and ("binary.jsonl", formats.UNREADABLE_FILE) in categories
    # markup is data: kept verbatim as text (the page escapes it when showing it)
    assert any(m["content"] == "<script>alert('x')</script><img src=x onerror=alert(1)>"
               for e in _examples(tmp_path / "out") for m in e["messages"])
    assert report["ok"] and all(w for w in report["warnings"])
    # every drop is counted once, in what it was: whole files that could not be read, lines, rows, conversations
    unreadable = [f["file"] for f in report["files"] if f["error"]]
    assert report["totals"]["dropped_by_unit"]["files"] == len(unreadable) >= 3
    assert sum(report["totals"]["dropped_by_unit"].values()) == report["totals"]["dropped"] == len(report["dropped"])
    assert all(any(w.startswith(f"{name} was skipped: ") for w in report["warnings"]) for name in unreadable)


# -- detect --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,fmt,columns", [
    ("kettle_openai.jsonl", "openai-jsonl", []), ("kettle_sharegpt.json", "sharegpt-json", []),
    ("kettle_tickets.csv", "messages-csv", ["ticket_id", "created_at", "author", "body"]),
    ("kettle_transcripts.txt", "transcript-txt", []),
])
def test_detect_samples(name, fmt, columns):
    info = dataset.detect(SAMPLES / name)
    assert (info["format"], info["columns"], info["encoding"]) == (fmt, columns, "utf-8")
    assert info["unmapped"] == [] and info["sampled_conversations"] == 96
    assert set(info["speaker_roles"].values()) == {"user", "assistant"}
    if fmt == "messages-csv":
        assert info["column_map"] == {"conversation": "ticket_id", "timestamp": "created_at", "speaker": "author",
                                      "text": "body"}
        assert set(info["speakers"]) == {"Customer", "Agent Rosa", "Agent Finn", "Agent Marlo"}


def test_detect_reads_only_the_start_of_a_large_export(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "DETECT_LINES", 50)
    path = tmp_path / "rows.csv"
    path.write_text("conversation_id,speaker,text\n" + "".join(f"{i},Customer,hi\n{i},Agent,ahoy\n" for i in range(1000)))
    info = dataset.detect(path)
    assert info["format"] == "messages-csv" and 20 <= info["sampled_conversations"] <= 25


def test_progress_is_reported_per_file(tmp_path, tokenizer):
    seen: list[tuple[float, str]] = []
    paths = [_jsonl(tmp_path / f"{n}.jsonl", [_chat(i) for i in range(6)]) for n in ("a", "b")]
    dataset.convert(paths, tmp_path / "out", ConvertConfig(min_examples=1), tokenizer=tokenizer,
                    progress=lambda fraction, text: seen.append((fraction, text)))
    assert [round(f, 2) for f, _ in seen] == [0.5, 1.0]
    assert seen[-1][1].startswith("b.jsonl: 12 conversations")


def test_detect_lists_unmapped_speakers_and_honours_names(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("Maya: hi\nKettle & Co.: Ahoy!\n")
    assert dataset.detect(path)["unmapped"] == ["Maya", "Kettle & Co."]
    info = dataset.detect(path, ConvertConfig(assistant_names=["Kettle & Co."], user_names=["Maya"]))
    assert info["unmapped"] == [] and info["speaker_roles"] == {"Maya": "user", "Kettle & Co.": "assistant"}


def test_detect_offers_only_the_real_speakers_of_a_transcript_with_code():
    # the page's speaker checklist comes from detect: code lines in replies must not appear there
    info = dataset.detect(Path(__file__).parent / "data" / "transcript_with_code.txt")
    assert info["speakers"] == ["Customer", "Agent Maya"] and info["unmapped"] == []
    assert info["sampled_conversations"] == 24 and info["sampled_dropped"] == 0


# -- fuzz: convert never crashes and accounts for every conversation --------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=25)
_line = st.one_of(st.builds(lambda s, t: f"{s}: {t}", st.sampled_from(["Customer", "Agent", "Maya", "Bot"]), _text),
                  st.sampled_from(["", "=== Chat ==="]), _text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(_line, min_size=1, max_size=30))
def test_fuzz_convert_accounts_for_every_conversation(tokenizer, lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        report = dataset.convert([path], Path(tmp) / "out", ConvertConfig(min_examples=1, max_length=64),
                                 tokenizer=tokenizer)
        entry = report["files"][0]
        conversation_drops = {formats.UNMAPPED_SPEAKER, formats.NO_ASSISTANT, formats.TOO_LONG}
        dropped_convs = sum(1 for d in report["dropped"] if d["category"] in conversation_drops)
        assert entry["conversations_read"] == entry["conversations_kept"] + dropped_convs
        assert entry["conversations_kept"] == report["train_examples"] + report["validation_examples"]
        assert len(_examples(Path(tmp) / "out")) == entry["conversations_kept"]
        for example in _examples(Path(tmp) / "out"):
            roles = [m["role"] for m in example["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant"
            assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # sides alternate after merging


# -- the command line ---------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", "convert", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ)


def test_cli_converts_and_prints_json(tmp_path, default_model_path):
    out = _cli(str(SAMPLES / "kettle_transcripts.txt"), str(SAMPLES / "kettle_openai.jsonl"), "--out",
               str(tmp_path / "out"), "--json", "--redact-pii", "--max-length", "512", "--system-prompt", "Kettle crew.")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["train_examples"] + report["validation_examples"] == 192
    assert report["stats"]["exact_duplicates"] == 96  # the same conversations twice
    assert report["stats"]["system_prompt_added"] == 192 and report["pii_redacted"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["files"] == report["files"]
    assert all(e["messages"][0] == {"role": "system", "content": "Kettle crew."} for e in _examples(tmp_path / "out"))


def test_cli_converts_a_transcript_whose_replies_contain_code(tmp_path, default_model_path):
    # issue 17: every turn is stamped and is Customer or Agent Maya; def ...:, else:, try: are code in replies
    source = Path(__file__).parent / "data" / "transcript_with_code.txt"
    out = _cli(str(source), "--out", str(tmp_path / "out"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (entry,) = report["files"]
    assert (entry["conversations_read"], entry["conversations_kept"], entry["dropped"]) == (24, 24, 0)
    assert report["unmapped_speakers"] == [] and report["dropped"] == []
    assert not any("no role" in w for w in report["warnings"])
    examples = _examples(tmp_path / "out")
    assert len(examples) == 24
    replies = "\n".join(m["content"] for e in examples for m in e["messages"] if m["role"] == "assistant")
    reply_lines = set(replies.splitlines())
    turn = re.compile(r"^\[[\d: -]+\] (Customer|Agent Maya): ")
    body = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip() and not turn.match(line)]
    assert len(body) > 100 and "def quicksort(arr):" in body and "    else:" in body and "try:" in body
    assert [line for line in body if line not in reply_lines] == []  # every code line, indentation and all
    assert "    retries -= 1\nelse:\n    print('done')" in replies  # in order, inside one reply
    assert "        return 'hot'\n\n\ndef main():" in replies  # blank lines between definitions kept


def test_cli_fails_with_a_one_line_reason(tmp_path, default_model_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"Maya: question {i}\nKettle & Co.: Ahoy {i}!\n\n" for i in range(12)))
    out = _cli(str(log), "--out", str(tmp_path / "out"))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: no usable examples yet; ")
    assert "NOT trainable" in out.stdout and "'Maya' (12)" in out.stdout and "--assistant" in out.stdout
    # mapping the speakers fixes it, and the summary says so
    fixed = _cli(str(log), "--out", str(tmp_path / "out"), "--user", "Maya", "--assistant", "Kettle & Co.")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.startswith("Ready to train: ") and "log.txt [transcript-txt]" in fixed.stdout
    bad = _cli(str(log), "--out", str(tmp_path / "out"), "--column", "oops")
    assert bad.returncode == 2 and "FIELD=NAME" in bad.stderr


def test_counts_stay_exact_after_a_padded_batch_call_on_the_same_tokenizer(tmp_path, tokenizer):
    """The playground and the voice check call the tokenizer with padding=True, which leaves padding switched on
    in the fast tokenizer's backend: counted there, every example measured the longest one (the suite found 21
    short examples 'over 256 tokens' after such a call)."""
    from tuner.dataset import TokenCounter, token_lengths

    texts = ["short", "a much longer text " * 20]
    exact = token_lengths(tokenizer, texts)
    tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.backend_tokenizer.padding is not None  # the state the bug came from
    assert token_lengths(tokenizer, texts) == exact
    assert TokenCounter(tokenizer).count(texts) == exact
