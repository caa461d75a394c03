"""tuner.words: counts and lists read as sentences, never "1 example(s)"."""

from __future__ import annotations

import pytest

from tuner.words import agree, and_list, plural


@pytest.mark.parametrize("n,word,kwargs,expected", [
    (0, "example", {}, "0 examples"),
    (0, "usable example", {"zero": "no"}, "no usable examples"),
    (1, "example", {}, "1 example"),
    (2, "example", {}, "2 examples"),
    (12_345, "line", {}, "12,345 lines"),
    (3, "entry", {}, "3 entries"),
    (2, "match", {}, "2 matches"),
    (2, "day", {}, "2 days"),
    (1, "unreadable file", {}, "1 unreadable file"),
    (2, "person", {"many": "people"}, "2 people"),
])
def test_plural(n, word, kwargs, expected):
    assert plural(n, word, **kwargs) == expected


def test_verbs_and_pronouns_agree_with_the_count():
    assert [agree(1, w) for w in ("is", "was", "has", "speaker")] == ["is", "was", "has", "speaker"]
    assert [agree(2, w) for w in ("is", "was", "has", "speaker")] == ["are", "were", "have", "speakers"]
    assert agree(0, "this") == "these"


@pytest.mark.parametrize("items,expected", [
    ([], ""), (["Priya"], "'Priya'"), (["Priya", "Dave"], "'Priya' and 'Dave'"),
    (["Priya", "Dave", "Rosa"], "'Priya', 'Dave' and 'Rosa'"),
])
def test_and_list(items, expected):
    assert and_list(items, "'") == expected
