"""Find and redact personal data in message text: e-mail, phone, card number, IBAN, IP address.

Structured PII only, each candidate checked by a real validator (phonenumbers, Luhn and IBAN check
digits from python-stdnum, the ipaddress module), so order numbers and dates are not redacted.
Nothing leaves the machine.

>>> redact("Mail me at ana@example.com or call +44 20 7946 0958.")
('Mail me at [EMAIL] or call [PHONE].', Counter({'email': 1, 'phone': 1}))
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from functools import lru_cache

PLACEHOLDERS: dict[str, str] = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]", "ip": "[IP]"}
TYPES = tuple(PLACEHOLDERS)
# the kinds (report.json's `pii` keys) in words: (one, many)
PII_WORDS = {"email": ("e-mail address", "e-mail addresses"), "phone": ("phone number", "phone numbers"),
             "card": ("card number", "card numbers"), "iban": ("IBAN", "IBANs"), "ip": ("IP address", "IP addresses")}

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
# 4-4-4-4(-3) groups, Amex 4-6-5, or one run of 13-19 digits
_CARD = re.compile(r"(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}|\d{4}[ -]?\d{6}[ -]?\d{5}|\d{13,19})(?![\d])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_MANY_DIGITS = re.compile(r"\d(?:[\s().\-/]*\d){6,}")  # phones, cards and IBANs all have 7+ digits
_IPV4_HINT = re.compile(r"\d\.\d+\.\d")
_IPV6_HINT = re.compile(r"::|(?:[0-9A-Fa-f]{1,4}:){3}")
# what any PII needs: an "@", 7+ digits, a dotted number or (with a colon) an IPv6 shape; checked in that order
# because the hex pattern would be tried at every a-f letter (3x slower as one alternation)
_DIGITS_HINT = re.compile(r"\d(?:[\s().\-/]*\d){6,}|\d\.\d+\.\d")
# a bare digit run after these words is an id, not a phone number ("order 2025030210")
_ID_BEFORE = re.compile(r"(?:#|\b(?:order|ticket|case|ref|reference|invoice|id|no|number|tracking|account|acct|"
                        r"booking|confirmation|customer|sku|serial)\b\.?:?)\s*$", re.IGNORECASE)


def _iban_spans(text: str) -> list[tuple[int, int]]:
    from stdnum import iban

    spans = []
    for m in _IBAN.finditer(text):
        candidate = m.group()
        # the pattern may run into a following capitalised word: shorten group by group
        while len(candidate.replace(" ", "")) >= 15:
            if iban.is_valid(candidate):
                spans.append((m.start(), m.start() + len(candidate)))
                break
            cut = candidate.rfind(" ")
            if cut < 0:
                break
            candidate = candidate[:cut]
    return spans


def _card_spans(text: str) -> list[tuple[int, int]]:
    from stdnum import luhn

    spans = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
            continue
        # issuer prefixes (Visa 4, Mastercard 51-55/2221-2720, Amex/Diners/JCB 3, Discover/UnionPay 6)
        if digits[0] not in "3456" and not 2221 <= int(digits[:4]) <= 2720:
            continue
        if luhn.is_valid(digits):
            spans.append(m.span())
    return spans


def _ip_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    patterns = [p for p, hint in ((_IPV4, _IPV4_HINT), (_IPV6, _IPV6_HINT)) if hint.search(text)]
    for pattern in patterns:
        for m in pattern.finditer(text):
            try:
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            spans.append(m.span())
    return spans


@lru_cache(maxsize=1)
def _phone_matcher():
    import phonenumbers

    return phonenumbers


def _phone_spans(text: str, region: str) -> list[tuple[int, int]]:
    phonenumbers = _phone_matcher()
    spans = []
    for m in phonenumbers.PhoneNumberMatcher(text, region, phonenumbers.Leniency.VALID):
        if m.raw_string.isdigit() and _ID_BEFORE.search(text, 0, m.start):
            continue
        spans.append((m.start, m.end))
    return spans


def might_hold_pii(text: str) -> bool:
    """False when `text` cannot hold any PII type found here (no "@", no 7+ digits, no IP shape)."""
    return "@" in text or _DIGITS_HINT.search(text) is not None or (":" in text and _IPV6_HINT.search(text) is not None)


def find(text: str, region: str = "US") -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans of PII in `text`, in order.

    `region` is the country assumed for phone numbers written without a +country prefix.
    """
    found: list[tuple[int, int, str]] = []
    if not might_hold_pii(text):
        return found  # most messages hold no PII: one cheap scan decides

    def add(spans: list[tuple[int, int]], kind: str) -> None:
        for start, end in spans:
            if all(end <= s or start >= e for s, e, _ in found):
                found.append((start, end, kind))

    if "@" in text:
        add([m.span() for m in _EMAIL.finditer(text)], "email")
    many_digits = _MANY_DIGITS.search(text) is not None
    if many_digits:
        add(_iban_spans(text), "iban")
        add(_card_spans(text), "card")
    add(_ip_spans(text), "ip")
    if many_digits:
        add(_phone_spans(text, region), "phone")
    return sorted(found)


def count(text: str, region: str = "US") -> Counter[str]:
    """How many of each PII type `text` holds."""
    return Counter(kind for _, _, kind in find(text, region))


def redact(text: str, region: str = "US") -> tuple[str, Counter[str]]:
    """`text` with each PII span replaced by its typed placeholder, and the counts per type."""
    spans = find(text, region)
    if not spans:
        return text, Counter()
    out, last = [], 0
    for start, end, kind in spans:
        out.append(text[last:start])
        out.append(PLACEHOLDERS[kind])
        last = end
    out.append(text[last:])
    return "".join(out), Counter(kind for _, _, kind in spans)
