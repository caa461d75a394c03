"""Which tokens are the assistant's, derived from the model's own chat template (any family).

trl limits the loss to the replies only for templates carrying `{% generation %}` markers, which
few models ship and trl patches in for a fixed list. Instead we render the conversation with the
model's template and find each reply in the text: the prefix up to an assistant turn, rendered
with the generation prompt, is the prompt the model sees at chat time; the reply's content
follows it, then the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
`<|end|>`, `</s>`, ...). Exactly the content and that token are trained; role headers, the text
between turns and replies with `weight: 0` are not. Characters map to tokens through the fast
tokenizer's offsets, so the tokens are those the trainer sees.
"""

from __future__ import annotations

from typing import Any

from tuner.errors import ModelError

FIX = ("Fix: pick a chat model whose template writes each reply verbatim followed by an end-of-turn token, "
       "or set `assistant_only_loss: false` in the run config (then every token is trained).")


def _render(tokenizer, messages: list[dict[str, Any]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _special_strings(tokenizer) -> list[str]:
    """Added special tokens' texts, longest first (so '<|end|>' never shadows '<|endoftext|>')."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    texts.update(t for t in tokenizer.all_special_tokens if t)
    return sorted(texts, key=len, reverse=True)


def _model_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "this model")


def reply_spans(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the character spans to train on.

    Each span runs from a trained reply's first character to the end of its end-of-turn token.
    A reply is looked for after the prompt the template gives for it (the conversation up to it
    with the generation prompt) when that prompt is a prefix of the whole text; a template that
    rewrites earlier turns (not prefix-stable) has its replies looked for in order instead.
    Raises ModelError naming the model when a reply is not in the text verbatim or no end-of-turn
    token follows it.

    >>> # text, spans = reply_spans(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    >>> # [text[a:b] for a, b in spans] == ["Hello<|im_end|>"]
    """
    full = _render(tokenizer, messages, False)
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = cursor
        if i > 0:
            try:
                prompt = _render(tokenizer, messages[:i], True)
            except Exception:  # noqa: BLE001 (a template may refuse a partial conversation: look in order then)
                prompt = ""
            if full.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
        content = message["content"].strip()
        pos = full.find(content, start) if content else start
        if pos < 0:
            raise ModelError(
                f"The chat template of {_model_name(tokenizer)} does not write assistant reply {i} "
                f"verbatim (message {i} of a training example), so tuner cannot tell which tokens are the reply. "
                + FIX)
        end = pos + len(content)
        gap = len(full[end:]) - len(full[end:].lstrip())
        token = next((s for s in specials if full.startswith(s, end + gap)), None)
        if token is None:
            raise ModelError(
                f"The chat template of {_model_name(tokenizer)} ends assistant reply {i} with "
                f"{full[end:end + 20]!r}, not with an end-of-turn token, so a model trained on it would not learn "
                "to stop. " + FIX)
        cursor = end + gap + len(token)
        if message.get("weight", 1) != 0:
            spans.append((pos, cursor))
    return full, spans


def assistant_mask(tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(input_ids, mask): the conversation's tokens as the trainer sees them and 1 on each trained token.

    A token is trained when it overlaps a reply span (a token that joins a reply's first character to
    the header's space, as sentencepiece's '▁Hello' does, is the reply's).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"The tokenizer of {_model_name(tokenizer)} is a slow (Python) tokenizer without "
                         "character offsets. Fix: save the model with its fast tokenizer (tokenizer.json).")
    text, spans = reply_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for a, b in enc["offset_mapping"]:
        mask.append(int(any(a < e and s < max(b, a + 1) for s, e in spans)))
    return list(enc["input_ids"]), mask


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template closes a reply with (`<|eot_id|>`, `<end_of_turn>`, ...), or None.

    Generation stops there; models whose generation_config names only the end-of-text token would
    otherwise run on into a next turn.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "tuner-probe-reply"}]
    try:
        text, spans = reply_spans(tokenizer, probe)
    except Exception:  # noqa: BLE001 (no usable template: the caller keeps its other stop tokens)
        return None
    start, end = spans[0]
    return text[start:end].split("tuner-probe-reply", 1)[1].strip() or None
