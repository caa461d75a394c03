"""Speaker labels -> chat roles: the names tuner knows for each side, and `role_of`.

Its own module so that the parsers (tuner.formats), which learn which labels of a transcript are speakers, and
the conversion (tuner.dataset), which maps them, share one list without importing each other.
"""

from __future__ import annotations

import re
import unicodedata

ASSISTANT_LABELS = frozenset({
    "assistant", "gpt", "chatgpt", "bot", "chatbot", "agent", "support", "support agent", "support team", "rep",
    "representative", "operator", "staff", "helpdesk", "help desk", "advisor", "adviser", "ai", "model", "csr",
    "customer service", "customer support", "customer care", "service desk", "concierge", "specialist",
})
USER_LABELS = frozenset({
    "user", "human", "customer", "client", "visitor", "end-user", "end user", "enduser", "guest", "caller", "member",
    "requester", "requestor", "prompter", "buyer", "shopper", "contact", "patient", "student", "consumer",
})
# role schemas (OpenAI, ShareGPT, Alpaca) accept only their own names, not free speaker labels
SCHEMA_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                "model": "assistant"}


def _label(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().replace("_", " ").split()).strip(" .:-")


def role_of(label: str, strict: bool = False, assistant_names: list[str] | tuple[str, ...] = (),
            user_names: list[str] | tuple[str, ...] = ()) -> str | None:
    """'assistant', 'user' or 'system' for a speaker label; None when it cannot be told.

    >>> role_of("Agent Rosa"), role_of("customer"), role_of("Kettle & Co.", assistant_names=["Kettle & Co."])
    ('assistant', 'user', 'assistant')
    """
    key = _label(label)
    if key in {_label(n) for n in assistant_names}:
        return "assistant"
    if key in {_label(n) for n in user_names}:
        return "user"
    if strict:
        return SCHEMA_ROLES.get(key)
    if key == "system":
        return "system"
    if key in ASSISTANT_LABELS:
        return "assistant"
    if key in USER_LABELS:
        return "user"
    # "Agent Rosa", "Rosa (support)", "Customer #123": a known label as one of the words
    words = set(re.findall(r"[^\W_]+(?:-[^\W_]+)*", key))
    sides = {"assistant" for w in words if w in ASSISTANT_LABELS} | {"user" for w in words if w in USER_LABELS}
    return sides.pop() if len(sides) == 1 else None
