"""Base vs tuned, side by side, from ONE copy of the base weights.

A `Playground` holds one base model and the LoRA adapters of the runs loaded on it. The base
column runs with the adapter switched off (peft `disable_adapter()`, or the `"__base__"` rows of a
mixed-adapter batch); in compare mode every column is one row of a single batched `generate`
(`adapter_names=["__base__", "<run>"]`), so comparing costs about as much as one reply.
Replies stream token by token (a `TextStreamer` per row, fed from one generate thread), decode
only the new tokens and stop at the chat template's end-of-turn token.

    pg = Playground()
    pg.load_run("run-20261121-233012-a1b2")
    for partial in pg.stream_compare({}, "Where is my order?", ["base", "tuned"]):
        print(partial)            # {"base": "Your order...", "tuned": "Happy to help! ..."}
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.config import GenerationConfig, add_config_arguments, config_overrides
from tuner.errors import ModelError, RunNotFound, TunerError
from tuner.limits import MAX_INPUT_TOKENS
from tuner.precision import serving_dtype
from tuner.retrieve import RETRIEVE_K
from tuner.voice import make_brand_brief, training_replies

BASE, TUNED, PROMPTED, RETRIEVED = "base", "tuned", "prompted", "retrieved"
COLUMNS = (BASE, TUNED, PROMPTED, RETRIEVED)
COLUMN_HELP = {
    BASE: "The base model, adapter switched off: what you started from.",
    TUNED: "The base model with this run's adapter: what fine-tuning learned.",
    PROMPTED: "The base model told the brand brief as its system prompt: what prompting alone gets you.",
    RETRIEVED: "The base model told the brand brief and shown the k training conversations most like the question "
               "(BM25, tuner.retrieve): what retrieval gets you without training.",
}
NOTICE_KEY = "notice"  # extra key in stream_compare's dicts when the input had to be trimmed
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" rows in a mixed-adapter batch
# end-of-turn markers of common chat templates; only those that appear in the template are used
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
# pickle-based weight files run code when loaded: never load them
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


# -- runs ------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What the playground needs to know about a completed run."""

    run_dir: Path
    run_id: str
    base_model: str
    quantization: str
    method: str
    adapter_dir: Path
    system_prompt: str | None = None  # the system message the training data used, if any
    brand_brief: str = ""  # default system prompt of the "prompted" column


def check_safetensors_folder(folder: Path, weights: str = "adapter_model.safetensors") -> None:
    """Raise ModelError unless `folder` holds safetensors weights and no pickle weight files."""
    # training_args.bin (Trainer's pickled settings) sits next to adapters; it is never loaded
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        # security: .bin/.pt files are pickles that can run code when loaded
        raise ModelError(f"{folder} holds pickle weight files ({', '.join(pickles)}); only safetensors are loaded. "
                         "Fix: re-save the weights with safetensors and delete those files.")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no {weights}: only safetensors weights are loaded.")


def serving_quantization(run_quantization: str, dev: str, requested: str = "auto") -> str:
    """How the playground loads a run's base: as trained on a GPU; in 16/32 bits on a CPU, where 4-bit
    generation measured 2x slower and its load 8x slower (SmolLM2-135M, 2 cores). The run's own voice
    check (tuner.train.voicecheck) grades the adapter on this same base, so its verdict is what users see."""
    if requested != "auto":
        return requested
    return run_quantization if dev == "cuda" else "none"


def read_run(run: str | Path) -> RunInfo:
    """Read the config and status of a run with a result (no model loading): completed, or saved and
    still running its voice check (tuner.runs.has_result)."""
    from tuner.runs import Run, has_result, resolve

    run_dir = resolve(run).path.resolve()
    status_file = Run(run_dir).status_file
    try:
        status = json.loads(status_file.read_text())
    except (OSError, ValueError) as exc:
        raise RunNotFound(f"{status_file}: cannot read the run status ({exc}).") from None
    if not has_result(status):
        raise TunerError(f"Run {run_dir.name} is '{status.get('status')}', not completed: "
                         "only a run that has saved its result has an adapter to chat with.")
    if not status.get("adapter"):
        raise ModelError(f"{status_file} names no adapter; the run did not save one.")
    adapter_dir = Path(status["adapter"])
    adapter_dir = (adapter_dir if adapter_dir.is_absolute() else run_dir / adapter_dir).resolve()
    if not adapter_dir.is_relative_to(run_dir):  # a run folder copied or moved: its own adapter/ (or model/)
        adapter_dir = run_dir / adapter_dir.name
    # security: a status file must not point the loader outside its own run folder
    if not adapter_dir.is_relative_to(run_dir) or not adapter_dir.is_dir():
        raise ModelError(f"{status_file}: adapter '{status['adapter']}' is not a folder inside the run.")
    cfg = Run(run_dir).config()
    method = cfg.method.value
    if method == "lora":
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(f"{adapter_dir} has no adapter_config.json: not a peft adapter folder.")
        check_safetensors_folder(adapter_dir)
    else:
        check_safetensors_folder(adapter_dir, "model.safetensors")
    info = RunInfo(run_dir=run_dir, run_id=run_dir.name, base_model=cfg.base_model,
                   # the base as trained ('auto' resolved), which serving_quantization serves from
                   quantization="nf4" if cfg.uses_nf4() else "none", method=method, adapter_dir=adapter_dir)
    replies, info.system_prompt = training_replies(Run(run_dir).data_file("train.jsonl"))
    info.brand_brief = make_brand_brief(replies, info.system_prompt)
    return info


# -- messages and trimming -------------------------------------------------------------------------


def message_text(content: Any) -> str:
    """Message content as text: gr.Chatbot may hand over a list of {type, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def clean_history(history: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """Keep user/assistant turns as plain {role, content} dicts (Chatbot messages carry metadata)."""
    out = []
    for m in history or []:
        role = m.get("role")
        if role in ("user", "assistant"):
            out.append({"role": role, "content": message_text(m.get("content"))})
    return out


def count_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    """Prompt length in tokens, chat template and generation prompt included."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(enc["input_ids"])


def fit_messages(tokenizer, messages: list[dict[str, str]], limit: int) -> tuple[list[dict[str, str]], str | None]:
    """Drop the oldest turns (then the start of the last message) until the prompt fits `limit` tokens.

    Returns the messages that fit and a notice for the user, or None when nothing was cut.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system):])
    if count_tokens(tokenizer, messages) <= limit:
        return messages, None
    dropped = 0
    while len(turns) > 1 and count_tokens(tokenizer, system + turns) > limit:
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with the user
            turns.pop(0)
            dropped += 1
    notice = f"The conversation is longer than the model's input limit of {limit} tokens"
    if dropped:
        notice += f": the oldest {dropped} message{'s' if dropped > 1 else ''} were left out"
    fitted = system + turns
    over = count_tokens(tokenizer, fitted) - limit
    if over > 0:  # the last message alone is too long: keep its end, where the question usually is
        last = fitted[-1]
        ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
        keep = max(len(ids) - over - 8, 0)
        while True:
            text = tokenizer.decode(ids[len(ids) - keep:]) if keep else ""
            fitted = fitted[:-1] + [{"role": last["role"], "content": text}]
            if keep == 0 or count_tokens(tokenizer, fitted) <= limit:
                break
            keep = max(keep - 16, 0)
        if count_tokens(tokenizer, fitted) > limit:
            raise TunerError(f"The system prompt alone is longer than the input limit of {limit} tokens; shorten it.")
        notice += f"{' and' if dropped else ':'} the start of the last message was cut ({over} tokens)"
    return fitted, notice + "."


# -- streaming -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One column's reply to one conversation, with what it cost (Playground.generate_replies)."""

    text: str
    ended: bool  # the reply ended its turn (else max_new_tokens or a stop cut it)
    new_tokens: int
    prompt_tokens: int  # what the model read: system prompt, examples, history and chat template
    seconds: float  # its batch's generate time shared equally by the batch's rows


@dataclass
class _Row:
    column: str
    messages: list[dict[str, str]]
    adapter: str  # BASE_ADAPTER or a peft adapter name
    model_key: str  # "base" or a full-model run folder


@dataclass
class _Event:
    kind: str  # "text" (a chunk), "final" (the exact full reply), "error", "done"
    row: int = -1
    text: str = ""
    tokens: int = 0
    error: BaseException | None = None
    ended: bool = False  # "final": the reply ended its turn (else max_new_tokens or a stop cut it)
    prompt_tokens: int = 0  # "final": the tokens of the row's prompt (chat template included, padding not)
    batch_s: float = 0.0  # "final": seconds the row's batch took to generate
    batch_rows: int = 0  # "final": rows in that batch


@dataclass
class _Job:
    rows: list[_Row]
    settings: GenerationConfig
    events: queue.Queue = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the reader goes away
    caller_stop: threading.Event | None = None  # set by the caller (a Stop button) to end it early
    by_column: bool = False  # one batch per column (each column's seconds measured alone) instead of per model

    def stopped(self) -> bool:
        return self.stop.is_set() or (self.caller_stop is not None and self.caller_stop.is_set())


def _row_streamer_class():
    from transformers import TextStreamer

    class RowStreamer(TextStreamer):
        """A TextStreamer for one row of a batch: finished words go to the job's event queue."""

        def __init__(self, tokenizer, events: queue.Queue, row: int):
            super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
            self.events, self.row = events, row

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.events.put(_Event("text", self.row, text))

    return RowStreamer


def _batch_streamer(tokenizer, events: queue.Queue, rows: list[int], end_ids: set[int]):
    """A generate() streamer for a batch: splits each step's tokens into per-row text streams."""
    from transformers.generation.streamers import BaseStreamer

    RowStreamer = _row_streamer_class()

    class BatchStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.rows = [RowStreamer(tokenizer, events, r) for r in rows]
            self.finished = [False] * len(rows)
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first pushes the prompt: decode only new tokens
                self.prompt_seen = True
                return
            for i, token in enumerate(value.reshape(-1).tolist()):
                if self.finished[i]:
                    continue
                if token in end_ids:  # end of turn: this row is done; padding follows
                    self.finished[i] = True
                    continue
                self.rows[i].put(value.reshape(-1)[i : i + 1])

        def end(self) -> None:
            for r in self.rows:
                if r.token_cache:
                    r.end()

    return BatchStreamer()


def _stop_criteria(job: _Job):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenAsked(StoppingCriteria):
        """Ends generation early when the reader went away (closed the stream) or the caller asked to stop."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.stopped(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenAsked()])


# -- the playground --------------------------------------------------------------------------------


class Playground:
    """One base model plus the adapters of the runs loaded on it; thread-safe generation.

    Args:
        max_input_tokens: prompt budget (history included); older turns are trimmed beyond it.
        device: "cuda" or "cpu" (default: cuda when present).
        quantization: "auto" (the run's own on CUDA; 16/32-bit on CPU, where 4-bit is slower),
            "none" or "nf4".
        max_adapters: adapters kept loaded at once; the least recently used one is dropped.
        dtype: the weights' torch dtype (default: tuner.precision.serving_dtype; benchmarks try others).
    """

    def __init__(self, max_input_tokens: int = MAX_INPUT_TOKENS, device: str | None = None,
                 quantization: str = "auto", max_adapters: int = 4, dtype: Any = None):
        from tuner.models import device as default_device

        if quantization not in ("auto", "none", "nf4"):
            raise TunerError(f"quantization must be auto, none or nf4, got '{quantization}'.")
        self.max_input_tokens = max_input_tokens
        self.device = device or default_device()
        self.quantization = quantization
        self.dtype = dtype or serving_dtype(self.device)
        self.max_adapters = max(1, max_adapters)
        self.model = None  # the base model; a peft PeftModel once an adapter is loaded
        self.tokenizer = None
        self.base_key: tuple[str, str] | None = None  # (resolved base model, quantization)
        self.base_loads = 0  # how many times a base model was loaded (switching runs keeps it)
        self._adapters: OrderedDict[Path, str] = OrderedDict()  # run folder -> peft adapter name
        self._full: OrderedDict[Path, Any] = OrderedDict()  # method=full runs: their own model
        self._runs: dict[Path, RunInfo] = {}
        self._next_adapter = 0
        self._end_ids: set[int] = set()
        self._indexes: dict[Path, Any] = {}  # run folder -> tuner.retrieve.ExampleIndex of its train.jsonl
        self.run: RunInfo | None = None  # the most recently loaded run (default for `run=None`)
        # one generate at a time: peft adapter state and the model are shared by every session
        self._lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------------

    def _quantization_for(self, run_quantization: str) -> str:
        return serving_quantization(run_quantization, self.device, self.quantization)

    def load_base(self, base_model: str = "default", quantization: str | None = None) -> None:
        """Load `base_model` unless it is already the loaded base (then nothing happens).

        `quantization` None keeps whatever the loaded copy of this model uses (or, for a new
        load, "none"), so a base-only chat never reloads a model that a run loaded in 4 bits.
        """
        from tuner.models import load_model, load_tokenizer, resolve_model

        location = resolve_model(base_model)
        with self._lock:
            if self.base_key is not None and self.base_key[0] == location and quantization in (None, self.base_key[1]):
                return
            quantization = quantization or self._quantization_for("none")
            key = (location, quantization)
            self.model = None  # release the old base (and its adapters) before loading the next
            self._adapters.clear()
            self._runs = {p: r for p, r in self._runs.items() if p in self._full}
            tokenizer = load_tokenizer(base_model)
            tokenizer.padding_side = "left"  # batched generation appends after the prompt
            self.model = load_model(base_model, quantization=quantization, dev=self.device,
                                    dtype=self.dtype)
            self.tokenizer = tokenizer
            self._end_ids = self._end_of_turn_ids(self.model)
            self.base_key = key
            self.base_loads += 1

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The tokens that end a reply (the chat template's end of turn and the model's eos)."""
        return sorted(self._end_ids)

    def _end_of_turn_ids(self, model) -> set[int]:
        tok = self.tokenizer
        ids: set[int] = set()
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        template = tok.chat_template if isinstance(tok.chat_template, str) else str(tok.chat_template)
        from tuner.templates import end_of_turn_token

        for marker in (*END_OF_TURN_TOKENS, end_of_turn_token(tok)):  # known ones, and the one this template uses
            if marker and marker in template:
                tid = tok.convert_tokens_to_ids(marker)
                if isinstance(tid, int) and tid != tok.unk_token_id:
                    ids.add(tid)
        return ids

    def load_run(self, run: str | Path) -> RunInfo:
        """Load a completed run (an id or a run folder). The base is reloaded only if it differs;
        a run that is loaded already costs nothing (the app calls this for every message)."""
        from tuner.runs import resolve

        run_dir = resolve(run).path.resolve()
        with self._lock:
            info = self._runs.get(run_dir)
            if info is not None and run_dir in self._adapters:
                self._adapters.move_to_end(run_dir)
                self.run = info
                return info
            if info is not None and run_dir in self._full:
                self.run = info
                return info
        info = read_run(run_dir)
        with self._lock:
            if info.method == "full":
                self._load_full(info)
            else:
                self.load_base(info.base_model, self._quantization_for(info.quantization))
                self._load_adapter(info)
            self._runs[info.run_dir] = info
            self.run = info
        return info

    def _load_adapter(self, info: RunInfo) -> None:
        from peft import PeftModel

        if info.run_dir in self._adapters:
            self._adapters.move_to_end(info.run_dir)
            return
        name = f"run{self._next_adapter}"  # run ids may hold '.', which peft module names cannot
        self._next_adapter += 1
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(info.adapter_dir), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(info.adapter_dir), adapter_name=name,
                                                       is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"Could not load the adapter in {info.adapter_dir}: {exc}") from exc
        self.model.eval()
        self._adapters[info.run_dir] = name
        while len(self._adapters) > self.max_adapters:
            old_dir, old_name = self._adapters.popitem(last=False)
            self.model.delete_adapter(old_name)
            self._runs.pop(old_dir, None)

    def _load_full(self, info: RunInfo) -> None:
        from tuner.models import load_model

        if self.model is None:
            self.load_base(info.base_model, self._quantization_for(info.quantization))
        if info.run_dir not in self._full:
            self._full[info.run_dir] = load_model(str(info.adapter_dir), quantization="none", dev=self.device,
                                                  dtype=self.dtype)
            while len(self._full) > 1:  # a fully fine-tuned model is a second copy: keep one only
                old, _ = self._full.popitem(last=False)
                self._runs.pop(old, None)
        self._full.move_to_end(info.run_dir)

    def _run_info(self, run: str | Path | None) -> RunInfo | None:
        """The loaded run `run` (None: the last one loaded), loading it again if it was dropped."""
        from tuner.runs import resolve

        if run is None:
            if self.run is None:
                return None
            run_dir = self.run.run_dir
        else:
            run_dir = resolve(run).path.resolve()
        info = self._runs.get(run_dir)
        if info is not None and (run_dir in self._adapters or run_dir in self._full):
            return info
        return self.load_run(run_dir)

    # -- building prompts --------------------------------------------------------------------

    def input_limit(self, settings: GenerationConfig) -> int:
        """Prompt budget in tokens: MAX_INPUT_TOKENS, and room for the reply in the model's context."""
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        limit = self.max_input_tokens
        if context:
            limit = min(limit, int(context) - settings.max_new_tokens)
        return max(limit, 16)

    def _messages(self, history, message: str, system: str | None, settings: GenerationConfig):
        msgs = ([{"role": "system", "content": system}] if system else []) + clean_history(history)
        msgs.append({"role": "user", "content": message_text(message)})
        return fit_messages(self.tokenizer, msgs, self.input_limit(settings))

    def example_index(self, info: RunInfo):
        """The BM25 index of the run's training conversations (tuner.retrieve), built on first use."""
        from tuner.retrieve import ExampleIndex
        from tuner.runs import Run

        if info.run_dir not in self._indexes:
            self._indexes[info.run_dir] = ExampleIndex.from_file(Run(info.run_dir).data_file("train.jsonl"))
        return self._indexes[info.run_dir]

    def _rows(self, history_by_column, message, columns, system_prompt, brand_brief, settings, run,
              k: int = RETRIEVE_K):
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown or not columns:
            raise TunerError(f"Unknown column(s) {unknown or '(none)'}; choose from {', '.join(COLUMNS)}.")
        if self.model is None:
            raise TunerError("No model is loaded: load a run (or the base model) first.")
        info = self._run_info(run)
        if TUNED in columns and info is None:
            raise TunerError("The tuned column needs a trained run: load one first.")
        if RETRIEVED in columns and info is None:
            raise TunerError("The retrieved column shows a run's training conversations: load a run first.")
        if system_prompt is None:  # the run's own: the tuned model learned with it
            system_prompt = info.system_prompt if info else None
        if brand_brief is None:
            brand_brief = info.brand_brief if info else ""
        rows, notices = [], []
        for column in columns:
            system = brand_brief if column in (PROMPTED, RETRIEVED) else system_prompt
            history = list((history_by_column or {}).get(column) or [])
            if column == RETRIEVED:  # the examples come first, so trimming drops them before the chat itself
                assert info is not None
                history = self.example_index(info).examples(message_text(message), k) + clean_history(history)
            msgs, notice = self._messages(history, message, system, settings)
            if notice and notice not in notices:
                notices.append(notice)
            adapter, model_key = BASE_ADAPTER, "base"
            if column == TUNED:
                assert info is not None
                if info.method == "full":
                    model_key = str(info.run_dir)
                else:
                    adapter = self._adapters[info.run_dir]
            rows.append(_Row(column, msgs, adapter, model_key))
        return rows, " ".join(notices) or None

    # -- generation --------------------------------------------------------------------------

    def _run_job(self, job: _Job) -> None:
        """Worker thread: generate every row (one batched pass per model) and report events."""
        try:
            with self._lock:
                groups: dict[tuple[str, str], list[int]] = {}
                for i, row in enumerate(job.rows):
                    groups.setdefault((row.model_key, row.column if job.by_column else ""), []).append(i)
                for (model_key, _), indices in groups.items():
                    if job.stopped():
                        break
                    self._generate_group(job, model_key, indices)
        except BaseException as exc:  # reported to the reader, who raises it in the caller's thread
            job.events.put(_Event("error", error=exc))
        finally:
            job.events.put(_Event("done"))

    def _generate_group(self, job: _Job, model_key: str, indices: list[int]) -> None:
        import torch
        from peft import PeftModel

        tok = self.tokenizer
        model = self.model if model_key == "base" else self._full[Path(model_key)]
        rows = [job.rows[i] for i in indices]
        batch = tok.apply_chat_template([r.messages for r in rows], add_generation_prompt=True, padding=True,
                                        return_tensors="pt", return_dict=True).to(model.device)
        s = job.settings
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens, "repetition_penalty": s.repetition_penalty,
            "eos_token_id": sorted(self._end_ids), "pad_token_id": tok.pad_token_id,
            "streamer": _batch_streamer(tok, job.events, indices, self._end_ids),
            "stopping_criteria": _stop_criteria(job),
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:  # greedy: repeatable
            kwargs["do_sample"] = False
        adapters = [r.adapter for r in rows]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()  # left padding is not read
        started = time.perf_counter()
        torch.manual_seed(s.seed)
        with torch.inference_mode():
            if isinstance(model, PeftModel) and len(set(adapters)) == 1 and adapters[0] != BASE_ADAPTER:
                # one adapter for every row: the plain LoRA forward, cheaper than a mixed batch
                if model.active_adapter != adapters[0]:
                    model.set_adapter(adapters[0], inference_mode=True)
                out = model.generate(**batch, **kwargs)
            elif isinstance(model, PeftModel) and any(a != BASE_ADAPTER for a in adapters):
                out = model.generate(**batch, adapter_names=adapters, **kwargs)
            elif isinstance(model, PeftModel):
                with model.disable_adapter():  # the base column: same weights, adapter off
                    out = model.generate(**batch, **kwargs)
            else:
                out = model.generate(**batch, **kwargs)
        took = time.perf_counter() - started
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        for i, ids, read in zip(indices, new, prompt_tokens, strict=True):
            end = next((k for k, t in enumerate(ids) if t in self._end_ids), len(ids))
            # a reply cut by max_new_tokens can end inside a multi-byte character: drop its half
            text = tok.decode(ids[:end], skip_special_tokens=True).rstrip("\ufffd")
            job.events.put(_Event("final", i, text, tokens=end, ended=end < len(ids), prompt_tokens=int(read),
                                  batch_s=took, batch_rows=len(indices)))

    def _events(self, rows: list[_Row], settings: GenerationConfig, stop: threading.Event | None = None,
                by_column: bool = False) -> Iterator[_Event]:
        """Start the worker thread and hand its events over; closing the iterator (or setting `stop`) stops generation."""
        job = _Job(rows, settings, caller_stop=stop, by_column=by_column)
        worker = threading.Thread(target=self._run_job, args=(job,), daemon=True, name="tuner-generate")
        worker.start()
        try:
            while True:
                event = job.events.get()
                if event.kind == "done":
                    return
                if event.kind == "error":
                    err = event.error
                    if isinstance(err, TunerError):
                        raise err
                    raise ModelError(f"Generation failed: {type(err).__name__}: {err}") from err
                yield event
        finally:
            job.stop.set()

    def stream_compare(
        self,
        history_by_column: Mapping[str, Sequence[Mapping[str, Any]]] | None,
        message: str,
        columns: Sequence[str] = (BASE, TUNED),
        settings: GenerationConfig | None = None,
        system_prompt: str | None = None,
        brand_brief: str | None = None,
        run: str | Path | None = None,
    ) -> Iterator[dict[str, str]]:
        """Stream the replies of several columns to the same message, generated in one batch.

        Yields {column: reply so far} (plus NOTICE_KEY when old turns were trimmed); the last
        dict holds the full replies. `history_by_column[col]` is that column's own chat so far
        ([{role, content}], as gr.Chatbot keeps it). `system_prompt` None means the run's own
        training system prompt (or the template's default); `brand_brief` None means the run's
        brief (used by the "prompted" column only). `run` None means the last loaded run.
        """
        settings = settings or GenerationConfig()
        with self._lock:
            rows, notice = self._rows(history_by_column, message, list(columns), system_prompt, brand_brief,
                                      settings, run)
        replies = {r.column: "" for r in rows}

        def snapshot() -> dict[str, str]:
            return {**replies, NOTICE_KEY: notice} if notice else dict(replies)

        events = self._events(rows, settings)
        try:
            for event in events:
                col = rows[event.row].column
                replies[col] = event.text if event.kind == "final" else replies[col] + event.text
                yield snapshot()
        finally:
            events.close()

    def stream(self, history: Sequence[Mapping[str, Any]] | None, message: str, column: str = TUNED,
               settings: GenerationConfig | None = None, system_prompt: str | None = None,
               run: str | Path | None = None) -> Iterator[str]:
        """Stream one column's reply: yields the reply so far."""
        for partial in self.stream_compare({column: history or []}, message, [column], settings, system_prompt,
                                           run=run):
            yield partial[column]

    def compare(self, history_by_column: Mapping[str, Sequence[Mapping[str, Any]]] | None, message: str,
                columns: Sequence[str] = (BASE, TUNED), settings: GenerationConfig | None = None,
                system_prompt: str | None = None, brand_brief: str | None = None,
                run: str | Path | None = None) -> dict[str, str]:
        """The full replies of several columns (one batched generate); NOTICE_KEY when trimmed."""
        last: dict[str, str] = {c: "" for c in columns}
        for partial in self.stream_compare(history_by_column, message, columns, settings, system_prompt,
                                           brand_brief, run):
            last = partial
        return last

    def reply(self, history: Sequence[Mapping[str, Any]] | None, message: str, column: str = TUNED,
              settings: GenerationConfig | None = None, system_prompt: str | None = None,
              run: str | Path | None = None) -> str:
        """One column's full reply."""
        return self.compare({column: history or []}, message, [column], settings, system_prompt, run=run)[column]

    def generate_many(self, conversations: Sequence[Sequence[Mapping[str, Any]]], columns: Sequence[str],
                      settings: GenerationConfig | None = None, run: str | Path | None = None,
                      brand_brief: str | None = None, stop: threading.Event | None = None) -> list[dict[str, str]]:
        """Replies to many finished conversations (each ends with a user turn), all columns batched.

        Used by evaluation; the conversations keep their own system messages. Setting `stop` ends
        the generation early (the replies are then cut where they were).
        """
        settings = settings or GenerationConfig()
        rows = self._conversation_rows(conversations, columns, settings, run, brand_brief)
        out: list[dict[str, str]] = [{} for _ in conversations]
        for event in self._events(rows, settings, stop):
            if event.kind == "final":
                out[event.row // len(columns)][rows[event.row].column] = event.text
        return out

    def generate_replies(self, conversations: Sequence[Sequence[Mapping[str, Any]]], columns: Sequence[str],
                         settings: GenerationConfig | None = None, run: str | Path | None = None,
                         stop: threading.Event | None = None, k: int = RETRIEVE_K) -> list[dict[str, Reply]]:
        """As generate_many, with what each reply cost, and each column in a batch of its own so that its
        seconds are its own (a column's rows share one generate call, whose time they split equally).
        `k`: the examples the retrieved column is shown."""
        settings = settings or GenerationConfig()
        rows = self._conversation_rows(conversations, columns, settings, run, None, k)
        out: list[dict[str, Reply]] = [{} for _ in conversations]
        for event in self._events(rows, settings, stop, by_column=True):
            if event.kind == "final":
                out[event.row // len(columns)][rows[event.row].column] = Reply(
                    event.text, event.ended, event.tokens, event.prompt_tokens,
                    event.batch_s / max(event.batch_rows, 1))
        return out

    def _conversation_rows(self, conversations: Sequence[Sequence[Mapping[str, Any]]], columns: Sequence[str],
                           settings: GenerationConfig, run: str | Path | None, brand_brief: str | None,
                           k: int = RETRIEVE_K) -> list[_Row]:
        with self._lock:
            rows: list[_Row] = []
            for conv in conversations:
                conv = [{"role": m["role"], "content": message_text(m.get("content"))} for m in conv]
                system = [m["content"] for m in conv[:1] if m["role"] == "system"]
                history, message = conv[len(system):-1], conv[-1]["content"]
                sys_prompt = system[0] if system else ""
                built, _ = self._rows({c: history for c in columns}, message, list(columns), sys_prompt or None,
                                      brand_brief, settings, run, k)
                rows.extend(built)
        return rows

    def answers(self, conversations: Sequence[Sequence[Mapping[str, Any]]], columns: Sequence[str],
                settings: GenerationConfig | None = None,
                run: str | Path | None = None) -> dict[str, tuple[list[str], list[bool]]]:
        """Each column's replies to many finished conversations, batched as generate_many batches them, and
        whether each ended its turn (else max_new_tokens cut it): what a run's voice check grades."""
        settings = settings or GenerationConfig()
        rows = self._conversation_rows(conversations, columns, settings, run, None)
        out = {c: ([""] * len(conversations), [False] * len(conversations)) for c in columns}
        for event in self._events(rows, settings):
            if event.kind == "final":
                replies, ended = out[rows[event.row].column]
                replies[event.row // len(columns)], ended[event.row // len(columns)] = event.text, event.ended
        return out

    def prompt_texts(self, conversations: Sequence[Sequence[Mapping[str, Any]]], column: str,
                     settings: GenerationConfig | None = None, run: str | Path | None = None,
                     k: int = RETRIEVE_K) -> list[str]:
        """The prompts exactly as the model reads them in `column` (system prompt, examples, trimming, chat template)."""
        rows = self._conversation_rows(conversations, [column], settings or GenerationConfig(), run, None, k)
        return [self.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                for r in rows]

    @contextmanager
    def column_model(self, column: str, run: str | Path) -> Iterator[Any]:
        """The model set up as `column` of `run` (adapter off for base), held under the generation lock."""
        from peft import PeftModel

        with self._lock:
            info = self._run_info(run)
            if info is None:
                raise TunerError("Load a run first.")
            model = self.model
            if column == TUNED and info.method == "full":
                yield self._full[info.run_dir]
            elif isinstance(model, PeftModel) and column == BASE:
                with model.disable_adapter():
                    yield model
            elif isinstance(model, PeftModel):
                model.set_adapter(self._adapters[info.run_dir], inference_mode=True)
                yield model
            else:
                yield model

    def timed_compare(self, message: str, columns: Sequence[str] = (BASE, TUNED),
                      settings: GenerationConfig | None = None, system_prompt: str | None = None,
                      run: str | Path | None = None) -> dict[str, Any]:
        """Replies plus timing: seconds to the first streamed text, new tokens, tokens/s."""
        settings = settings or GenerationConfig()
        with self._lock:
            rows, notice = self._rows({}, message, list(columns), system_prompt, None, settings, run)
        started = time.perf_counter()
        first: float | None = None
        replies: dict[str, str] = {}
        tokens: dict[str, int] = {}
        for event in self._events(rows, settings):
            if first is None and event.kind == "text":
                first = time.perf_counter() - started
            if event.kind == "final":
                replies[rows[event.row].column] = event.text
                tokens[rows[event.row].column] = event.tokens
        total = time.perf_counter() - started
        return {
            "replies": replies, "notice": notice,
            "timing": {
                "first_token_s": round(first if first is not None else total, 3),
                "total_s": round(total, 3),
                "new_tokens": tokens,
                # every column's tokens came out of the same forward passes
                "tokens_per_s": round(sum(tokens.values()) / total, 2) if total else None,
                "tokens_per_s_per_column": round(max(tokens.values(), default=0) / total, 2) if total else None,
            },
        }


# -- CLI ------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="Run id, or path to a run folder.")
    parser.add_argument("--prompt", required=True, help="The user message.")
    parser.add_argument("--compare", action="store_true", help="Also answer with the base model (one batched pass).")
    parser.add_argument("--prompted", action="store_true", help="Also answer with the base model told the brand brief.")
    parser.add_argument("--columns", default=None,
                        help="Comma-separated columns to answer with (base,tuned,prompted,retrieved); overrides "
                             "--compare/--prompted.")
    parser.add_argument("--json", action="store_true", help="Print {prompt, replies, notice, timing} as JSON.")
    parser.add_argument("--system-prompt", default=None, help="System prompt (default: the run's training one).")
    add_config_arguments(parser.add_argument_group("generation settings (every GenerationConfig field)"),
                         GenerationConfig)


def settings_from_args(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(**config_overrides(args, GenerationConfig))


def cli(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    pg = Playground()
    pg.load_run(args.run)
    columns = ([BASE] if args.compare else []) + [TUNED] + ([PROMPTED] if args.prompted else [])
    if args.columns:
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    if args.json:
        result = pg.timed_compare(args.prompt, columns, settings, args.system_prompt)
        print(json.dumps({"prompt": args.prompt, **result}, indent=2, ensure_ascii=False))
        return 0
    if len(columns) == 1:  # one column: stream it to the terminal as it is written
        shown = ""
        for partial in pg.stream_compare({}, args.prompt, columns, settings, args.system_prompt):
            if NOTICE_KEY in partial and not shown:
                print(f"note: {partial[NOTICE_KEY]}", file=sys.stderr)
            text = partial[columns[0]]
            if text.startswith(shown):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
            shown = text
        print()
        return 0
    replies = pg.compare({}, args.prompt, columns, settings, args.system_prompt)
    if NOTICE_KEY in replies:
        print(f"note: {replies.pop(NOTICE_KEY)}", file=sys.stderr)
    for column in columns:
        print(f"== {column} ==\n{replies[column]}\n")
    return 0
