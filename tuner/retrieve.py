"""Retrieval instead of tuning: the k training exchanges most like a new question, as few-shot examples.

Light (no torch): `bm25s` (sparse BM25 over numpy/scipy) indexes the user turns of the run's own
training conversations (train.jsonl); nothing is downloaded, and the held-out conversations
(validation.jsonl, a prompts file) are never indexed, so the "retrieved" column of the playground
and of `tuner eval` answers with the user's own training data only, as a deployed retriever would.

    index = ExampleIndex.from_file(Run(run_dir).data_file("train.jsonl"))
    index.examples("Where is my order?", k=3)  # [{user}, {assistant}, ...]: least similar first
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import DataError

RETRIEVE_K = 3  # examples shown per question: each costs its tokens on every reply (the eval reports them)
CANDIDATES = 4  # BM25 hits read per example wanted, so k distinct conversations remain after de-duplication


@dataclass(frozen=True)
class Exchange:
    """A user turn and the agent's reply to it, from line `line` of the training file."""

    line: int
    user: str
    reply: str


def exchanges(rows: Sequence[tuple[int, Any]]) -> list[Exchange]:
    """Every (user turn, the assistant reply right after it) of {"messages": [...]} rows given as (line, row).

    >>> exchanges([(1, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})])
    [Exchange(line=1, user='Hi', reply='Hello!')]
    """
    out = []
    for line, row in rows:
        msgs = [m for m in (row.get("messages") or []) if isinstance(m, dict) and isinstance(m.get("content"), str)]
        for user, reply in zip(msgs, msgs[1:], strict=False):
            if user.get("role") == "user" and reply.get("role") == "assistant" and user["content"].strip() \
                    and reply["content"].strip():
                out.append(Exchange(line, user["content"], reply["content"]))
    return out


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class ExampleIndex:
    """BM25 over the user turns of training exchanges; `nearest` returns whole exchanges."""

    def __init__(self, items: Sequence[Exchange], source: str = "train.jsonl"):
        import bm25s

        if not items:
            raise DataError("no exchange (a user message and the agent's reply) to retrieve examples from. "
                            "Fix: retrieval needs training conversations with replies.", source)
        self.items = list(items)
        self.source = source
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize([e.user for e in self.items], stopwords="en", show_progress=False),
                         show_progress=False)

    @classmethod
    def from_file(cls, path: str | Path) -> ExampleIndex:
        """The index of a training file (JSONL of {"messages": [...]}, as tuner.dataset writes train.jsonl)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("no training file to retrieve examples from. Fix: pick a run whose data folder "
                            "still holds train.jsonl.", str(path))
        from tuner.messages import iter_jsonl

        return cls(exchanges([(n, r) for n, r in iter_jsonl(path) if isinstance(r, dict)]), str(path))

    def nearest(self, question: str, k: int = RETRIEVE_K) -> list[Exchange]:
        """The k exchanges whose user turn is most like `question` (BM25), most similar first; one per
        training conversation. A question sharing no word with any of them still gets k examples (the
        first of equal score): they show the voice, if not the answer."""
        if k <= 0:
            return []
        query = _tokens([question])[0]
        want = min(len(self.items), k * CANDIDATES)
        if not any(query):
            return self._distinct(range(want), k)
        hits, scores = self._bm25.retrieve([query], k=want, show_progress=False)
        if not scores[0].max() > 0:  # no word in common with any exchange
            return self._distinct(range(want), k)
        return self._distinct((int(i) for i in hits[0]), k)

    def _distinct(self, order, k: int) -> list[Exchange]:
        out, lines = [], set()
        for i in order:
            item = self.items[i]
            if item.line not in lines:
                out.append(item)
                lines.add(item.line)
            if len(out) == k:
                break
        return out

    def examples(self, question: str, k: int = RETRIEVE_K) -> list[dict[str, str]]:
        """The k nearest exchanges as chat turns, least similar first: the closest sits right before the
        question, and trimming to the input limit (which drops the oldest turns) drops the least similar."""
        turns: list[dict[str, str]] = []
        for ex in reversed(self.nearest(question, k)):
            turns += [{"role": "user", "content": ex.user}, {"role": "assistant", "content": ex.reply}]
        return turns
