"""tuner.pii: structured personal data is found by validators, replaced by typed placeholders, counted."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner import pii

FOUND = [
    ("write to ana.silva@example.com today", "write to [EMAIL] today", {"email": 1}),
    ("Mail: tea+orders@mail.example.co.uk.", "Mail: [EMAIL].", {"email": 1}),
    ("call +44 20 7946 0958 or (415) 555-0132", "call [PHONE] or [PHONE]", {"phone": 2}),
    ("appelez le +33 1 23 45 67 89", "appelez le [PHONE]", {"phone": 1}),
    ("card 4111 1111 1111 1111, exp 12/27", "card [CARD], exp 12/27", {"card": 1}),
    ("amex 3782-822463-10005 please", "amex [CARD] please", {"card": 1}),
    ("IBAN DE89 3704 0044 0532 0130 00 Thanks", "IBAN [IBAN] Thanks", {"iban": 1}),
    ("pay to GB82WEST12345698765432.", "pay to [IBAN].", {"iban": 1}),
    ("from 192.168.1.20 and 2001:db8:85a3::8a2e:370:7334", "from [IP] and [IP]", {"ip": 2}),
    ("Anna <anna@example.org>, +1 415 555 0132, 4111111111111111",
     "Anna <[EMAIL]>, [PHONE], [CARD]", {"email": 1, "phone": 1, "card": 1}),
]

NOT_FOUND = [
    "order #48213377 placed 2025-03-02 10:02:13",
    "ticket 2025030210 is closed",  # ten digits, but an id
    "order 1234567890123456",  # fails the Luhn check
    "999.168.1.1 is no address",
    "we open at 10:02:13, see you",
    "KC-52445 left the harbour",
    "the @channel was pinged",
    "DE00 1234 5678 9012 3456 78",  # wrong IBAN check digits
    "[EMAIL] and [PHONE] are already redacted",
]


@pytest.mark.parametrize("text,redacted,counts", FOUND)
def test_pii_is_found_and_redacted(text, redacted, counts):
    out, found = pii.redact(text)
    assert out == redacted
    assert dict(found) == counts
    assert dict(pii.count(text)) == counts


@pytest.mark.parametrize("text", NOT_FOUND)
def test_lookalikes_are_left_alone(text):
    assert pii.redact(text) == (text, {})


def test_redaction_is_idempotent():
    once, _ = pii.redact(FOUND[-1][0])
    assert pii.redact(once) == (once, {})


def test_region_decides_numbers_without_country_code():
    text = "ring me on 030 12345678"
    assert pii.count(text, region="US")["phone"] == 0
    assert pii.redact(text, region="DE") == ("ring me on [PHONE]", {"phone": 1})


def test_spans_do_not_overlap_and_are_ordered():
    text = "a@example.com 4111111111111111 10.0.0.1 +44 20 7946 0958"
    spans = pii.find(text)
    assert [kind for _, _, kind in spans] == ["email", "card", "ip", "phone"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


_OLD_HINT = re.compile(r"@|\d(?:[\s().\-/]*\d){6,}|\d\.\d+\.\d|::|(?:[0-9A-Fa-f]{1,4}:){3}")  # one scan, 3x slower


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789abcdefXYZ:.@ -()/+\n")), max_size=40))
def test_cheap_prefilter_skips_exactly_the_texts_without_a_pii_shape(text):
    assert pii.might_hold_pii(text) == bool(_OLD_HINT.search(text))
    if not pii.might_hold_pii(text):
        assert pii.find(text) == []


@pytest.mark.parametrize("text,_redacted,_counts", FOUND)
def test_prefilter_lets_every_kind_through(text, _redacted, _counts):
    assert pii.might_hold_pii(text)
