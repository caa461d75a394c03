"""The model's chat template as Ollama's TEMPLATE (a Go text/template), derived by rendering probes.

A chat template wraps each message in fixed text and places the system prompt somewhere. We find
that text by rendering probe conversations with the model's own (Jinja) template, then write a Go
template that emits the same text. Three placements of the system prompt are known:

- its own turn at the start, replacing any default (ChatML, Llama 3, Phi 3.5);
- inside the first user turn (Gemma 3);
- inside the last user turn, the one being answered (Mistral v0.3).

`render_go_template` renders the Go subset we emit as Ollama does, so the export can check the
translation against the Jinja rendering before writing it. Light module: standard library only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_PROBE = {"system": "@@tuner-system@@", "user": "@@tuner-user-1@@", "assistant": "@@tuner-assistant-1@@",
          "user2": "@@tuner-user-2@@"}


def _render(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split_once(text: str, marker: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ValueError(f"the template does not place {marker} once")
    before, after = text.split(marker)
    return before, after


def _closing(tokenizer, no_gen: list[str], r_u: str, r_ug: str) -> str:
    """Text a template appends only when no reply is asked for (Phi 3.5 ends a finished chat with its eos)."""
    candidates = ["", tokenizer.eos_token or "", *sorted(tokenizer.all_special_tokens, key=len, reverse=True)]
    for c in candidates:
        if all(x.endswith(c) for x in no_gen) and r_ug.startswith(r_u[: len(r_u) - len(c)]):
            return c
    raise ValueError("later turns change the text of earlier ones")


def template_parts(tokenizer) -> dict[str, str]:
    """The text the chat template puts around each role's message and where it puts the system prompt.

    Raises ValueError for templates that are not a plain per-message wrapping (those get no TEMPLATE).
    """
    s, u, a, u2 = (_PROBE[k] for k in ("system", "user", "assistant", "user2"))
    sys_msg, user, reply, user2 = ({"role": "system", "content": s}, {"role": "user", "content": u},
                                   {"role": "assistant", "content": a}, {"role": "user", "content": u2})
    r_u, r_ua, r_uau = (_render(tokenizer, c, False) for c in ([user], [user, reply], [user, reply, user2]))
    r_ug = _render(tokenizer, [user], True)
    closing = _closing(tokenizer, [r_u, r_ua, r_uau], r_u, r_ug)
    r_u, r_ua, r_uau = (x[: len(x) - len(closing)] for x in (r_u, r_ua, r_uau))
    if not (r_ug.startswith(r_u) and r_ua.startswith(r_u) and r_uau.startswith(r_ua)):
        raise ValueError("later turns change the text of earlier ones")
    first_pre, user_post = _split_once(r_u, u)
    asst_pre, asst_post = _split_once(r_ua[len(r_u):], a)
    user_pre, user_post2 = _split_once(r_uau[len(r_ua):], u2)
    if user_post2 != user_post or not first_pre.endswith(user_pre):
        raise ValueError("user turns are not wrapped the same way each time")
    parts = {"head": first_pre[: len(first_pre) - len(user_pre)], "user_pre": user_pre, "user_post": user_post,
             "assistant_pre": asst_pre, "assistant_post": asst_post, "generation": r_ug[len(r_u):]}
    # where the system prompt goes: compare a chat answered with one to the same chat without
    plain = parts["head"] + user_pre + u + user_post + asst_pre + a + asst_post + user_pre + u2 + user_post
    plain += parts["generation"]
    with_system = _render(tokenizer, [sys_msg, user, reply, user2], True)
    first_user = parts["head"] + user_pre
    tail = plain[len(parts["head"]):]
    if with_system.endswith(tail) and s in with_system[: len(with_system) - len(tail)]:
        parts["system_at"] = "own turn"
        parts["system_pre"], parts["system_post"] = _split_once(with_system[: len(with_system) - len(tail)], s)
    elif with_system.startswith(first_user) and with_system.endswith(plain[len(first_user):]):
        parts["system_at"] = "first user turn"
        inserted = with_system[len(first_user): len(with_system) - len(plain) + len(first_user)]
        parts["system_pre"], parts["system_post"] = _split_once(inserted, s)
    else:
        last = plain.index(u2)
        if not (with_system.startswith(plain[:last]) and with_system.endswith(plain[last:])):
            raise ValueError("the system prompt is placed in a way tuner cannot translate")
        parts["system_at"] = "last user turn"
        parts["system_pre"], parts["system_post"] = _split_once(with_system[last: len(with_system) - len(plain)
                                                                             + last], s)
    return parts


def ollama_template(parts: dict[str, str]) -> str:
    """Ollama's TEMPLATE for the parts `template_parts` found (Go text/template over `.Messages`)."""
    if any("{{" in v or '"""' in v for v in parts.values()):
        raise ValueError("the template's text contains '{{' or '\"\"\"'")
    p = parts
    system = p["system_pre"] + "{{ $.System }}" + p["system_post"]
    if p["system_at"] == "own turn":
        head = "{{ if not .System }}" + p["head"] + "{{ end }}{{ range .Messages }}"
        system_turn = '{{ if eq .Role "system" }}' + p["system_pre"] + "{{ .Content }}" + p["system_post"] + "{{ else "
        user = p["user_pre"]
    elif p["system_at"] == "first user turn":
        head = p["head"] + "{{ $first := true }}{{ range .Messages }}"
        system_turn = "{{ "
        user = p["user_pre"] + "{{ if and $first $.System }}" + system + "{{ end }}{{ $first = false }}"
    else:  # the last message is the user turn being answered
        head = p["head"] + "{{ range $i, $_ := .Messages }}"
        system_turn = "{{ "
        user = p["user_pre"] + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}" + system + "{{ end }}"
    return (head + system_turn + 'if eq .Role "user" }}' + user + "{{ .Content }}" + p["user_post"]
            + '{{ else if eq .Role "assistant" }}' + p["assistant_pre"] + "{{ .Content }}" + p["assistant_post"]
            + "{{ end }}{{ end }}" + p["generation"])


# -- Go text/template, the subset above, rendered as Ollama does ---------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')
_FUNCS = {
    "not": lambda x: not _truth(x),
    "eq": lambda x, *ys: any(x == y for y in ys),
    "ne": lambda x, y: x != y,
    "and": lambda *xs: next((x for x in xs if not _truth(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truth(x)), xs[-1]),
    "len": len,
    "slice": lambda x, i=0, j=None: x[i:j],  # Go: slice x i j is x[i:j]
}


def _truth(value: Any) -> bool:
    return bool(value)  # Go: false, 0, "", nil and empty collections are false, as in Python


def _lex(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) tokens, with `{{-` / `-}}` trimming applied."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        tokens.append(("text", text.rstrip() if m.group(1) else text))
        tokens.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    tokens.append(("text", template[pos:]))
    return tokens


def _parse(tokens: list[tuple[str, str]], i: int, nested: bool) -> tuple[list, int, str]:
    """Nodes up to a closing `end` / `else ...` (returned as the third item) or the end of the template."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        word = value.split(" ", 1)[0] if kind == "action" else ""
        if kind == "text":
            nodes.append(("text", value))
        elif word in ("end", "else"):
            if not nested:
                raise ValueError(f"unexpected {{{{ {value} }}}}")
            return nodes, i, value
        elif word == "if":
            branches = []
            cond = value[3:].strip()
            while True:
                body, i, closer = _parse(tokens, i + 1, True)
                branches.append((cond, body))
                if closer == "end":
                    break
                rest = closer[len("else"):].strip()
                cond = rest[3:].strip() if rest.startswith("if ") else "true"
            nodes.append(("if", branches))
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*,\s*(\$\w*)\s*:=\s*)?(\$?\.Messages)", value)
            if m is None:
                raise ValueError(f"unsupported {{{{ {value} }}}}")
            body, i, closer = _parse(tokens, i + 1, True)
            if closer != "end":
                raise ValueError("{{ else }} in range is not supported")
            nodes.append(("range", (m.group(1), m.group(2), body)))
        elif re.match(r"\$\w+\s*:?=", value):
            name, expr = re.split(r"\s*:?=\s*", value, maxsplit=1)
            nodes.append(("set", (name, expr)))
        else:
            nodes.append(("print", value))
        i += 1
    if nested:
        raise ValueError("missing {{ end }}")
    return nodes, i, ""


def _evaluate(expr: str, dot: Any, root: dict[str, Any], env: dict[str, Any]) -> Any:
    words = _WORD.findall(expr)

    def operand(k: int) -> tuple[Any, int]:
        w = words[k]
        if w == "(":
            args, k = [], k + 1
            while words[k] != ")":
                value, k = operand(k)
                args.append(value)
            return call(args), k + 1
        if w.startswith('"'):
            return json.loads(w), k + 1
        if w in ("true", "false"):
            return w == "true", k + 1
        if re.fullmatch(r"-?\d+", w):
            return int(w), k + 1
        if w in _FUNCS:
            return _FUNCS[w], k + 1
        if w.startswith("$."):
            return _field(root, w[2:]), k + 1
        if w.startswith("$"):
            if w not in env:
                raise ValueError(f"undefined variable {w}")
            return env[w], k + 1
        if w.startswith("."):
            return _field(dot, w[1:]), k + 1
        raise ValueError(f"unsupported expression {expr!r}")

    def call(args: list[Any]) -> Any:
        if args and callable(args[0]):
            return args[0](*args[1:])
        if len(args) != 1:
            raise ValueError(f"unsupported expression {expr!r}")
        return args[0]

    args, k = [], 0
    while k < len(words):
        value, k = operand(k)
        args.append(value)
    return call(args)


def _field(obj: Any, name: str) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        raise ValueError(f"can't evaluate field {name}")  # as Go does: a message has no .System
    return obj[name]


def render_go_template(template: str, messages: Sequence[dict[str, str]]) -> str:
    """Render the Go-template subset `ollama_template` emits, as Ollama would for a chat.

    Supports text, `{{- -}}` trimming, `.System`/`.Messages` (and `$.` forms), `.Content`/`.Role` in
    a message, variables (`$x := ...`, `$x = ...`), `if`/`else if`/`else`/`end`, `range .Messages`
    (also `range $i, $_ := .Messages`) and the functions not, eq, ne, and, or, len and slice. Ollama
    passes every message (system ones too) in `.Messages`, consecutive messages of one role merged
    with a blank line, and all system messages joined by a blank line as `.System`.

    >>> render_go_template('{{ if not .System }}hi {{ end }}{{ range .Messages }}[{{ .Content }}]{{ end }}',
    ...                    [{"role": "user", "content": "a"}])
    'hi [a]'
    """
    nodes, _, _ = _parse(_lex(template), 0, False)
    msgs: list[dict[str, Any]] = []
    for m in messages:  # Ollama's collate(): consecutive messages of one role are merged
        if msgs and msgs[-1]["Role"] == m["role"]:
            msgs[-1]["Content"] += "\n\n" + m["content"]
        else:
            msgs.append({"Role": m["role"], "Content": m["content"]})
    root = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": msgs}
    env: dict[str, Any] = {}

    def run(nodes: list, dot: Any) -> str:
        out = []
        for kind, value in nodes:
            if kind == "text":
                out.append(value)
            elif kind == "print":
                out.append(str(_evaluate(value, dot, root, env)))
            elif kind == "set":
                env[value[0]] = _evaluate(value[1], dot, root, env)
            elif kind == "if":
                for cond, body in value:
                    if _truth(_evaluate(cond, dot, root, env)):
                        out.append(run(body, dot))
                        break
            else:
                index_var, item_var, body = value
                for i, m in enumerate(msgs):
                    if index_var:
                        env[index_var] = i
                    if item_var:
                        env[item_var] = m
                    out.append(run(body, m))
        return "".join(out)

    return run(nodes, root)


def _probe_conversations(system_prompt: str | None) -> list[list[dict[str, str]]]:
    system = system_prompt or "You are the support crew."
    turns = [{"role": "user", "content": "Hi, my kettle leaks."},
             {"role": "assistant", "content": "Sorry to hear that!\nWhich model is it?"},
             {"role": "user", "content": "The Dome 2."},
             {"role": "assistant", "content": "Thanks. It has a two-year warranty."},
             {"role": "user", "content": "Great, how do I claim it?"}]
    return [turns, [{"role": "system", "content": system}] + turns, turns[:1], turns[:3]]


def modelfile_template(tokenizer, system_prompt: str | None = None) -> tuple[str | None, list[str], str]:
    """(Ollama TEMPLATE or None, stop strings, a note). The TEMPLATE is kept only when it renders
    exactly the tokenizer's own chat template text for probe conversations (with and without a system message)."""
    eos = tokenizer.eos_token
    try:
        parts = template_parts(tokenizer)
        template = ollama_template(parts)
        for conv in _probe_conversations(system_prompt):
            if render_go_template(template, conv) != _render(tokenizer, conv, True):
                raise ValueError("the translated template renders a different prompt")
    except (ValueError, TypeError) as exc:
        return None, [eos] if eos else [], (f"no TEMPLATE: the chat template could not be translated ({exc}); "
                                            "Ollama then uses the template stored in the GGUF if it knows it")
    # end of a reply, end of sequence, and the start of a next turn (a model that runs on starts one)
    starts = [t for t in tokenizer.get_added_vocab() if parts["user_pre"].startswith(t)]
    stops = [t for t in dict.fromkeys([parts["assistant_post"].strip(), eos, *starts]) if t]
    return template, stops, "TEMPLATE translated from the model's chat template (checked by rendering)"
