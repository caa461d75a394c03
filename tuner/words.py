"""Counts and lists in sentences: "1 conversation", "3 conversations", "'Priya' and 'Dave'".

Every sentence the page or the command line writes about a count goes through `plural`, so no
message reads "1 example(s)" or "speaker 'Priya', 'Dave' is". Light module: standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable

IRREGULAR = {"this": "these", "is": "are", "was": "were", "has": "have", "it": "they", "its": "their"}


def plural_of(word: str) -> str:
    """The plural of an English noun or verb as tuner's messages use them.

    >>> plural_of("conversation"), plural_of("entry"), plural_of("is"), plural_of("speaker label")
    ('conversations', 'entries', 'are', 'speaker labels')
    """
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def plural(n: int, word: str, many: str | None = None, zero: str | None = None) -> str:
    """`n` and `word` agreeing in number, with thousands separators.

    >>> plural(1, "example"), plural(3, "example"), plural(1_200, "row"), plural(0, "example", zero="no")
    ('1 example', '3 examples', '1,200 rows', 'no examples')
    """
    form = word if n == 1 else (many or plural_of(word))
    return f"{zero if n == 0 and zero is not None else f'{n:,}'} {form}"


def agree(n: int, word: str) -> str:
    """`word` (a noun or verb) in the number of `n`, without the count: agree(2, "is") == "are"."""
    return word if n == 1 else plural_of(word)


def and_list(items: Iterable[object], quote: str = "") -> str:
    """Items joined as a sentence lists them.

    >>> and_list(["Priya"], "'"), and_list(["Priya", "Dave"], "'"), and_list(["a", "b", "c"])
    ("'Priya'", "'Priya' and 'Dave'", 'a, b and c')
    """
    words = [f"{quote}{item}{quote}" for item in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}" if words else ""
