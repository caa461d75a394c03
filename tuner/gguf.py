"""GGUF export: a run's merged model for llama.cpp, Ollama and LM Studio, checked by running it in llama.cpp.

    to_dir/
      <run>-<quant>.gguf   the merged model (llama.cpp's own converter; k-quants by llama.cpp)
      <run>-lora-f16.gguf  the adapter alone (optional; llama.cpp --lora, Ollama ADAPTER)
      Modelfile            Ollama: FROM, TEMPLATE (the model's chat template), stop, SYSTEM, sampling
      README.md            ollama create / llama-cli / LM Studio, and the check's result
      check.json           the held-out replies of transformers and llama.cpp side by side
      tuner_export.json    provenance (also: "safe to overwrite")

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `gguf-py`, taken from the
`llama-cpp-python` source distribution whose version is installed (so converter, gguf-py and the
runtime that checks the file agree), cached once a machine under `tools/`. It runs as a
subprocess in lazy mode: tensors stream from the safetensors file to the GGUF one at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import ModelError, TunerError
from tuner.ollama_template import modelfile_template, render_go_template  # noqa: F401 (part of this module's API)

QUANTS = ("f16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPE = {"f16": "f16", "q8_0": "q8_0", "q4_k_m": "f16"}  # q4_k_m: f16 first, then llama.cpp quantizes
SDIST_NAME = "llama-cpp-python"
VENDOR = "vendor/llama.cpp/"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
CONVERTER_DIRS = ("conversion/", "gguf-py/")
CHECK_PROMPTS = 3  # prompts whose greedy replies are compared token for token (the weights check)
CHECK_MAX_NEW_TOKENS = 48
FALLBACK_PROMPTS = 8  # held-out prompts the voice check asks when the run's voice check was off (voice_prompts 0)
VOICE_SLACK = 0.1  # share of held-out prompts a file may do worse on than the merged model (at least one)
REPEAT_LAST_N = 64  # tokens the repeat penalty looks back on: llama.cpp's and Ollama's default, written out
OLLAMA_TOP_K = 40  # Ollama's default top_k, which the Modelfile leaves alone
FP32_CHECK_BYTES = 4 * 2**30  # 16-bit weights up to this size are checked in fp32 (about 2B parameters)
MODELFILE = "Modelfile"
CHECK_FILE = "check.json"
Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    pass


# -- the converter: llama.cpp's own, from the llama-cpp-python sdist --------------------------------


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version (the converter is taken from the same release)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SDIST_NAME)
    except PackageNotFoundError:
        raise TunerError("GGUF export needs llama-cpp-python (llama.cpp's Python binding). Fix: run `make setup`, "
                         "or `pip install llama-cpp-python` (it builds llama.cpp from source: a C++ compiler and "
                         "cmake are needed, and the first build takes several minutes).") from None


def unavailable_reason() -> str | None:
    """None when GGUF export can run here; else why not, in plain words (for a page to show)."""
    try:
        llama_cpp_version()
    except TunerError as exc:
        return str(exc)
    return None


def tools_dir() -> Path:
    """Per-machine cache of tools (next to the model cache, so test sessions with their own home share it)."""
    from tuner.paths import models_dir

    env = os.environ.get("TUNER_TOOLS_DIR")
    d = Path(env).expanduser() if env else models_dir().parent / "tools"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _converter_member(name: str) -> str | None:
    """The path an sdist member is extracted to, or None for members the converter does not need."""
    parts = name.split("/", 1)
    if len(parts) < 2 or not parts[1].startswith(VENDOR):
        return None
    rel = parts[1][len(VENDOR):]
    if rel in CONVERTER_FILES or (rel.startswith(CONVERTER_DIRS) and not rel.startswith("gguf-py/tests/")):
        return rel
    return None


def ensure_converter(progress: Progress | None = None) -> Path:
    """llama.cpp's converter folder for the installed llama-cpp-python (fetched from PyPI once a machine).

    pip fetches the source distribution (from its own cache after `make setup` built the wheel);
    only the converter scripts, `conversion/` and `gguf-py/` are kept.
    """
    from tuner.models import file_lock

    version = llama_cpp_version()
    target = tools_dir() / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    (progress or _no_progress)(0.0, f"fetching llama.cpp's converter (llama-cpp-python {version} source)")
    with file_lock(target.with_suffix(".lock")):
        if (target / "convert_hf_to_gguf.py").is_file():
            return target
        with tempfile.TemporaryDirectory(prefix=".llama.cpp-", dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"{SDIST_NAME}=={version}", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            sdists = sorted(Path(tmp).glob("*.tar.gz"))
            if done.returncode != 0 or not sdists:
                raise TunerError(f"Could not fetch llama.cpp's converter (the {SDIST_NAME} {version} source "
                                 f"distribution) from the package index: {done.stderr.strip()[-300:]}. "
                                 "Fix: run `make setup` once on a machine that reaches PyPI.")
            out = Path(tmp) / "llama.cpp"
            with tarfile.open(sdists[0]) as tar:
                members = []
                for member in tar.getmembers():
                    rel = _converter_member(member.name)
                    if rel and (member.isfile() or member.isdir()):
                        member.name = rel
                        members.append(member)
                tar.extractall(out, members=members, filter="data")
            if not (out / "convert_hf_to_gguf.py").is_file():
                raise TunerError(f"{sdists[0].name} has no {VENDOR}convert_hf_to_gguf.py: this llama-cpp-python "
                                 "release does not vendor llama.cpp's converter. Fix: install another release.")
            os.replace(out, target)
    return target


def _converter_env(converter: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the vendored gguf-py must win over the gguf package installed for tuner: it matches the converter
    env["PYTHONPATH"] = os.pathsep.join([str(converter / "gguf-py"), str(converter)])
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the converter reads local folders only
    return env


# runs a converter script and prints its own peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's
# size over fork + exec), even when the script exits early
_PEAK_WRAPPER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    try:
        hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    except (OSError, IndexError):
        import resource
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("tuner-peak-rss-kb", hwm, flush=True)
"""


def _run_converter(args: list[str], converter: Path, progress: Progress, lo: float, hi: float,
                   layers: int, what: str) -> float:
    """Run a converter script (args[0]) with its arguments; progress follows the layers it has read.

    Returns the script's peak RSS in MB.
    """
    proc = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_converter_env(converter), cwd=converter)
    lines: list[str] = []
    seen: set[str] = set()
    peak_kb = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("tuner-peak-rss-kb "):
            peak_kb = int(line.split()[1])
            continue
        lines.append(line)
        found = re.search(r"blk\.(\d+)\.", line)
        if found and layers and found.group(1) not in seen:  # tensors come in name order: count the layers seen
            seen.add(found.group(1))
            progress(lo + (hi - lo) * 0.8 * min(1.0, len(seen) / layers), what)
    proc.wait()
    output = "".join(lines)
    if proc.returncode != 0:
        unsupported = re.search(r"Model (\S+) is not supported", output)
        if unsupported:
            raise TunerError(f"llama.cpp cannot convert the architecture {unsupported.group(1)}: its converter "
                             "has no support for it, so this run cannot be exported to GGUF. The merged model "
                             "export (--merge) still works.")
        if "pre-tokenizer was not recognized" in output or "Missing" in output and "tokenizer.model" in output:
            raise TunerError("llama.cpp's converter does not know this model's tokenizer (it recognises tokenizers "
                             "by their pre-tokenizer, or needs a sentencepiece tokenizer.model beside it), so "
                             "this run cannot be exported to GGUF. The merged model export (--merge) still works; "
                             "a newer llama.cpp may know the tokenizer.")
        raise TunerError(f"llama.cpp's converter failed (exit {proc.returncode}): {output.strip()[-600:]}")
    return peak_kb / 1024


def _architecture(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: cannot read the model config ({exc}).") from None
    return ",".join(config.get("architectures") or []) or str(config.get("model_type") or "unknown")


def convert_model(model_dir: str | Path, out_file: str | Path, outtype: str = "f16",
                  metadata: dict[str, Any] | None = None, progress: Progress | None = None,
                  lo: float = 0.0, hi: float = 1.0) -> float:
    """A Hugging Face model folder -> one GGUF file, with llama.cpp's converter in lazy (streaming) mode.

    Returns the converter's peak RSS in MB. Raises TunerError naming the architecture when
    llama.cpp cannot convert it.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    converter = ensure_converter(progress)
    layers = int(json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers") or 0)
    cmd = [str(converter / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    with tempfile.TemporaryDirectory() as tmp:
        if metadata:
            meta = Path(tmp) / "metadata.json"
            meta.write_text(json.dumps(metadata))
            cmd += ["--metadata", str(meta)]
        peak = _run_converter(cmd, converter, progress or _no_progress, lo, hi, layers,
                              f"converting {_architecture(model_dir)} to GGUF {outtype}")
    if not out_file.is_file():
        raise TunerError(f"llama.cpp's converter wrote no {out_file.name}.")
    return peak


def convert_adapter(adapter_dir: Path, base_dir: Path, out_file: Path, progress: Progress | None = None) -> float:
    """A peft LoRA adapter -> a GGUF LoRA (llama.cpp `--lora`, Ollama `ADAPTER`); returns the peak RSS in MB."""
    converter = ensure_converter(progress)
    cmd = [str(converter / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
           "--outfile", str(out_file), "--outtype", "f16"]
    return _run_converter(cmd, converter, progress or _no_progress, 0.0, 0.0, 0, "converting the adapter")


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """Quantize a GGUF with llama.cpp itself (`llama_model_quantize`): the k-quants."""
    import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0 or not dst.is_file():
        raise TunerError(f"llama.cpp could not quantize {src.name} to {quant} (code {code}).")
    return dst


# the chat template as Ollama's TEMPLATE: tuner.ollama_template


def _render_hf(tokenizer, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _quote(text: str) -> str:
    if '"""' in text:
        raise TunerError('The system prompt contains """, which an Ollama Modelfile cannot hold. '
                         "Fix: remove the triple quotes from the brand brief.")
    return f'"""{text}"""'


@dataclass(frozen=True)
class Shipped:
    """How the exported file is meant to be run: what the Modelfile ships, and what the README's commands,
    the GGUF's sampling metadata and the check read. One object, so the check runs the settings users get."""

    template: str | None  # Ollama TEMPLATE (None: Ollama uses the template stored in the GGUF)
    stops: tuple[str, ...]
    note: str  # how the TEMPLATE came about, in words
    system: str | None  # the brand brief the training data used
    temperature: float
    top_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    num_predict: int
    num_ctx: int

    def messages(self, user: str) -> list[dict[str, str]]:
        """A one-question chat as Ollama sends it: the Modelfile's SYSTEM, then the user's message."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]


def shipped_settings(tokenizer, system_prompt: str | None, context_length: int | None = None) -> Shipped:
    """The Modelfile's settings: the model's chat template and stops, the brief, the playground's sampling."""
    from tuner.config import GenerationConfig
    from tuner.limits import MAX_INPUT_TOKENS

    template, stops, note = modelfile_template(tokenizer, system_prompt)
    g = GenerationConfig()
    num_ctx = MAX_INPUT_TOKENS + g.max_new_tokens  # the playground's longest prompt and reply
    return Shipped(template=template, stops=tuple(stops), note=note, system=system_prompt or None,
                   temperature=g.temperature, top_p=g.top_p, repeat_penalty=g.repetition_penalty,
                   repeat_last_n=REPEAT_LAST_N, seed=g.seed, num_predict=g.max_new_tokens,
                   num_ctx=min(num_ctx, context_length) if context_length else num_ctx)


def write_modelfile(folder: Path, gguf_name: str, ship: Shipped, adapter_name: str | None = None) -> Path:
    """Write an Ollama Modelfile for `ship` next to the GGUF."""
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f"TEMPLATE {_quote(ship.template)}" if ship.template is not None else f"# {ship.note}")
    if ship.system:
        lines.append(f"SYSTEM {_quote(ship.system)}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in ship.stops]
    # the playground's defaults (greedy: replies repeat); repeat_last_n and num_ctx are written out, not left
    # to each runtime's default, so llama.cpp, Ollama and the check all penalise the same window
    lines += [f"PARAMETER temperature {ship.temperature}", f"PARAMETER top_p {ship.top_p}",
              f"PARAMETER repeat_penalty {ship.repeat_penalty}", f"PARAMETER repeat_last_n {ship.repeat_last_n}",
              f"PARAMETER seed {ship.seed}", f"PARAMETER num_predict {ship.num_predict}",
              f"PARAMETER num_ctx {ship.num_ctx}"]
    path = folder / MODELFILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def llama_cli_command(gguf_name: str, ship: Shipped) -> str:
    """The README's llama-cli line, with the Modelfile's sampling."""
    return (f"llama-cli -m {gguf_name} -cnv -c {ship.num_ctx} --temp {ship.temperature} --top-p {ship.top_p} "
            f"--repeat-penalty {ship.repeat_penalty} --repeat-last-n {ship.repeat_last_n} -n {ship.num_predict}")


# -- the check: llama.cpp answers like transformers ------------------------------------------------


def _leading_same(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _eos_ids(model_dir: Path, tokenizer) -> set[int]:
    ids = set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_merged(model_dir: Path):
    """The merged model in transformers (fp32 where cheap, else its own 16-bit dtype) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    # fp32 compute where it is cheap; a large model is checked in its own 16-bit dtype (RAM: its size on disk)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if weights < FP32_CHECK_BYTES else "auto",
                                                 trust_remote_code=False)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def transformers_replies(model, tokenizer, eos: set[int], prompts: Sequence[list[dict[str, str]]],
                         max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, greedy reply token ids without repetition penalty) of the merged model, per prompt."""
    import torch

    inputs, replies = [], []
    with torch.inference_mode():
        for messages in prompts:
            batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                                 eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id or min(eos))
            reply = out[0, batch["input_ids"].shape[1]:].tolist()
            inputs.append(batch["input_ids"][0].tolist())
            cut = next((i for i, t in enumerate(reply) if t in eos), len(reply))
            replies.append(reply[:cut])
    return inputs, replies


def llama_cpp_replies(gguf_file: Path, texts: Sequence[str], inputs: Sequence[list[int]],
                      references: Sequence[list[int]], eos: set[int],
                      max_new_tokens: int) -> tuple[list[bool], list[list[int]], list[float | None], str]:
    """llama.cpp's side of the weights check, per prompt: the prompt text tokenized as transformers did?, the
    greedy reply's token ids (no repetition penalty), and the next-token agreement with transformers' reply;
    plus the GGUF's chat template.

    Agreement is teacher-forced: the share of transformers' reply tokens that are also llama.cpp's top
    token after the same prefix. Unlike identical leading tokens, one near-tie does not end the count.
    """
    import llama_cpp
    import numpy as np

    n_ctx = max(len(ids) + len(ref) for ids, ref in zip(inputs, references, strict=True)) + max_new_tokens + 16
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, seed=0,
                          logits_all=True, verbose=False)
    try:
        same_tokens, replies, agreement = [], [], []
        for text, ids, ref in zip(texts, inputs, references, strict=True):
            same_tokens.append(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids)
            reply: list[int] = []
            # the transformers prompt ids: the comparison is about the weights, the tokenizer is checked above
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                if token in eos or len(reply) >= max_new_tokens:
                    break
                reply.append(token)
            replies.append(reply)
            if ref:
                llm.reset()
                llm.eval(ids + ref)
                top = np.argmax(llm.scores[len(ids) - 1: len(ids) - 1 + len(ref)], axis=-1)
                agreement.append(float(np.mean(top == np.array(ref))))
            else:
                agreement.append(None)
        template = llm.metadata.get("tokenizer.chat_template", "")
    finally:
        llm.close()
    return same_tokens, replies, agreement, template


def llama_cpp_chat(gguf_file: Path, ship: Shipped, texts: Sequence[str]) -> tuple[list[str], list[bool]]:
    """llama.cpp's replies to rendered chat prompts with the Modelfile's settings, and whether each ended its
    turn (an end-of-turn token or a stop string) before num_predict tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=ship.num_ctx, n_threads=os.cpu_count() or 1,
                          seed=ship.seed, last_n_tokens_size=ship.repeat_last_n, verbose=False)
    try:
        replies, ended = [], []
        for text in texts:
            # top_k and min_p: Ollama's defaults, which the Modelfile leaves alone (no effect when greedy)
            out = llm.create_completion(text, max_tokens=ship.num_predict, temperature=ship.temperature,
                                        top_p=ship.top_p, top_k=OLLAMA_TOP_K, min_p=0.0,
                                        repeat_penalty=ship.repeat_penalty, stop=list(ship.stops), seed=ship.seed)
            choice = out["choices"][0]
            replies.append(choice["text"].strip())
            ended.append(choice["finish_reason"] == "stop")
    finally:
        llm.close()
    return replies, ended


def _clip(text: str, chars: int = 400) -> str:
    """A reply short enough for a message; a long one keeps its start and its end (where sign-offs are)."""
    text = " ".join(text.split())
    return text if len(text) <= chars else f"{text[:chars // 3]} … {text[-(2 * chars) // 3:]}"


def _share(x: float) -> str:
    """A share as a percentage that says 100% only when it is all (0.996 is 99.6%)."""
    return "100%" if x == 1 else f"{min(x, 0.999):.1%}"


def voice_slack(prompts: int) -> int:
    """Held-out prompts a quantized file may do worse on than the merged model (a near-tie can flip)."""
    return max(1, round(VOICE_SLACK * prompts))


def _tally(replies: list[str], ended: list[bool], marker):
    """The voice verdict's counts for one side; without a habit, only the degenerate replies."""
    from tuner.verdict import Tally, degenerate, tally

    if marker is not None:
        return tally(replies, marker, ended)
    why = [degenerate(r, e) or "" for r, e in zip(replies, ended, strict=True)]
    return Tally(prompts=len(replies), looped=sum(w.startswith("loop") for w in why),
                 unended=sum(w == "no end of turn" for w in why), empty=sum(w == "empty" for w in why))


def _voice_words(marker, t) -> str:
    """The habit and loop counts of one side, in the voice verdict's words."""
    from tuner.verdict import verdict_sentence

    if marker is not None:
        return verdict_sentence(marker, t)
    return (f"{t.looped} of {t.prompts} replies looped"
            + (f", {t.unended} never ended {'its' if t.unended == 1 else 'their'} turn" if t.unended else "")
            + (f", {t.empty} said nothing" if t.empty else ""))


def check_gguf(gguf_file: Path, model_dir: Path, quant: str, ship: Shipped, prompts: Sequence[str],
               marker=None, weights_prompts: int = CHECK_PROMPTS,
               max_new_tokens: int = CHECK_MAX_NEW_TOKENS) -> dict[str, Any]:
    """Does the GGUF answer like the merged model? Two measurements on held-out user prompts:

    - the voice, as users run the file: llama.cpp with the Modelfile's template, system prompt, stops and
      sampling (`ship`) against the merged model in transformers with the playground's settings, both
      graded like the run's voice verdict (tuner.verdict: the habit `marker` exact or nearly, loops,
      replies that never end);
    - the weights, on the first `weights_prompts`: greedy replies without repetition penalty, token for
      token, and the teacher-forced next-token agreement.

    Passes when the prompt is tokenized the same, the GGUF holds the chat template, an f16 file's greedy
    replies are identical, and the file keeps the habit on at least as many prompts as the merged model
    and has no more degenerate replies, each within `voice_slack` prompts. `sentence` says it in words with
    numbers; a failure names the prompt, the file's reply and the merged model's.
    """
    from tuner.train.voicecheck import generate
    from tuner.verdict import degenerate, marker_match

    conversations = [ship.messages(p) for p in prompts]
    model, tokenizer = load_merged(model_dir)
    if tokenizer.pad_token is None:  # batched replies pad on the left
        tokenizer.pad_token = tokenizer.eos_token
    eos = _eos_ids(model_dir, tokenizer)
    try:
        weights_convs = conversations[:weights_prompts]
        inputs, reference = transformers_replies(model, tokenizer, eos, weights_convs, max_new_tokens)
        merged, merged_ended = generate(model, tokenizer, tokenizer.chat_template, conversations, ship.num_predict)
    finally:
        del model
        gc.collect()
    texts = [_render_hf(tokenizer, c, True) for c in weights_convs]
    same_prompt, replies, agreement, template = llama_cpp_replies(gguf_file, texts, inputs, reference, eos,
                                                                  max_new_tokens)
    # the prompt as Ollama renders it from the Modelfile's TEMPLATE (checked equal to the chat template's text)
    chat_texts = [render_go_template(ship.template, c) if ship.template is not None else _render_hf(tokenizer, c, True)
                  for c in conversations]
    served, served_ended = llama_cpp_chat(gguf_file, ship, chat_texts)

    weights_cases = []
    for messages, ref, got, same, agree in zip(weights_convs, reference, replies, same_prompt, agreement, strict=True):
        weights_cases.append({
            "prompt": messages[-1]["content"], "transformers": tokenizer.decode(ref, skip_special_tokens=True),
            "llama_cpp": tokenizer.decode(got, skip_special_tokens=True), "identical": ref == got,
            "same_prompt_tokens": same, "same_leading_tokens": _leading_same(ref, got), "reply_tokens": len(ref),
            "next_token_agreement": agree})
    identical = sum(c["identical"] for c in weights_cases)
    leading = [c["same_leading_tokens"] / max(1, c["reply_tokens"]) for c in weights_cases]
    agreed = [a for a in agreement if a is not None]

    cases = []
    for prompt, g, g_end, m, m_end in zip(prompts, served, served_ended, merged, merged_ended, strict=True):
        cases.append({"prompt": prompt, "gguf": g, "merged": m,
                      "habit_gguf": marker_match(g, marker) if marker else None,
                      "habit_merged": marker_match(m, marker) if marker else None,
                      "degenerate_gguf": degenerate(g, g_end), "degenerate_merged": degenerate(m, m_end)})
    g_tally, m_tally = _tally(served, served_ended, marker), _tally(merged, merged_ended, marker)
    n, slack = len(cases), voice_slack(len(cases))
    kept_ok = marker is None or g_tally.exact >= m_tally.exact - slack
    sane_ok = g_tally.degenerate <= m_tally.degenerate + slack
    same_template = template == (tokenizer.chat_template or "")
    tokens_ok = all(c["same_prompt_tokens"] for c in weights_cases)
    identical_ok = quant != "f16" or identical == len(weights_cases)
    passed = bool(cases) and tokens_ok and same_template and identical_ok and kept_ok and sane_ok

    # the prompts that show a failure: where the merged model kept the habit (or did not loop) and the file did not
    worse = [c for c in cases if (marker and c["habit_merged"] == "exact" and c["habit_gguf"] != "exact")
             or (c["degenerate_gguf"] and not c["degenerate_merged"])]
    failures = [{"prompt": c["prompt"], "gguf": c["gguf"], "merged": c["merged"],
                 "why": c["degenerate_gguf"] or f"habit {c['habit_gguf'] or 'missing'}"} for c in worse]
    if not identical_ok:
        failures += [{"prompt": c["prompt"], "gguf": c["llama_cpp"], "merged": c["transformers"],
                      "why": "not token for token identical (greedy, no repetition penalty)"}
                     for c in weights_cases if not c["identical"]]

    habit = (f"the {marker.kind} \"{marker.text}\"" if marker
             else "no habit (no phrase recurs in most training replies), so loops and unended replies only")
    words = [f"Run as the Modelfile says (llama.cpp), the {quant} file {_voice_words(marker, g_tally)}.",
             f"The merged model (transformers, the playground's settings): {_voice_words(marker, m_tally)}.",
             f"Graded on {n} held-out prompts for {habit}" + ("" if habit.rstrip('"').endswith((".", "!", "?")) else ".")]
    words.append(f"Weights: {identical} of {len(weights_cases)} greedy replies without repetition penalty are token "
                 f"for token identical" + (f", {_share(sum(agreed) / len(agreed))} of next tokens agree." if agreed else "."))
    if not tokens_ok:
        words.append("llama.cpp tokenizes the prompt differently from the model's own tokenizer.")
    if not same_template:
        words.append("The GGUF does not hold the model's chat template.")
    if passed:
        words.append("Passed.")
    else:
        words.append("FAILED." + "".join(f" On \"{_clip(f['prompt'], 200)}\" the {quant} file replied "
                                         f"\"{_clip(f['gguf'])}\" ({f['why']}); the merged model replied "
                                         f"\"{_clip(f['merged'])}\"." for f in failures[:2]))
    return {
        "passed": passed, "quant": quant, "sentence": " ".join(words), "failures": failures,
        "settings": dataclasses.asdict(ship),
        "voice": {"marker": marker.text if marker else None, "kind": marker.kind if marker else None,
                  "prompts": n, "slack": slack, "gguf": dataclasses.asdict(g_tally) if marker else
                  {"looped": g_tally.looped, "unended": g_tally.unended, "empty": g_tally.empty},
                  "merged": dataclasses.asdict(m_tally) if marker else
                  {"looped": m_tally.looped, "unended": m_tally.unended, "empty": m_tally.empty}},
        "weights": {"prompts": len(weights_cases), "identical_replies": identical,
                    "same_leading_token_share": round(sum(leading) / max(1, len(leading)), 3),
                    "next_token_agreement": round(sum(agreed) / len(agreed), 3) if agreed else None,
                    "max_new_tokens": max_new_tokens, "cases": weights_cases},
        "chat_template_in_gguf": same_template, "same_prompt_tokens": tokens_ok,
        "expectation": (f"the habit kept on as many held-out prompts as the merged model and no more degenerate "
                        f"replies, each within {slack} of {n}"
                        + ("; greedy replies token for token identical" if quant == "f16" else "")),
        "cases": cases,
    }


# -- the export ------------------------------------------------------------------------------------


def _metadata(info, cfg, status: dict[str, Any], ship: Shipped) -> dict[str, Any]:
    """GGUF metadata overrides (`general.*`): the run's model-card facts and the Modelfile's sampling."""
    from tuner.export import base_name

    facts = [f"{k}={status[k]:.4g}" if isinstance(status[k], float) else f"{k}={status[k]}"
             for k in ("step", "train_loss", "eval_loss", "tokens_trained") if status.get(k) is not None]
    return {
        "general.name": info.run_id, "general.finetune": info.run_id, "general.basename": base_name(cfg.base_model),
        "general.description": (f"{base_name(cfg.base_model)} fine-tuned by tuner ({cfg.method.value}, "
                                f"r={cfg.lora_r}, alpha={cfg.lora_alpha}, lr={cfg.learning_rate}, "
                                f"quantization={cfg.quantization.value}), run {info.run_id}; " + ", ".join(facts)),
        "general.tags": ["tuner", "sft", cfg.method.value],
        "general.sampling.temp": ship.temperature, "general.sampling.top_p": ship.top_p,
        "general.sampling.penalty_repeat": ship.repeat_penalty, "general.sampling.penalty_last_n": ship.repeat_last_n,
    }


def _readme(run_dir: Path, gguf_name: str, ship: Shipped, check: dict[str, Any] | None,
            adapter_name: str | None, base_name: str, method: str) -> str:
    from tuner.dataset import pii_statement
    from tuner.export import data_sentence
    from tuner.runs import Run

    run_id = run_dir.name
    name = re.sub(r"[^a-z0-9._-]+", "-", run_id.lower()).strip("-") or "tuned"
    what = f"{base_name} fully fine-tuned" if method == "full" else f"{base_name} with the run's LoRA adapter merged in"
    lines = [f"# {run_id} for llama.cpp, Ollama and LM Studio", "",
             f"`{gguf_name}` is the tuned model ({what}), converted by llama.cpp's own converter. Its metadata "
             "carries the chat template and the run's facts.", "",
             "## Ollama", "", "```bash", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
             "The Modelfile sets " + ("the chat template, " if ship.template is not None else "")
             + "the end-of-turn stop tokens, " + ("the brand's system prompt " if ship.system else "")
             + f"and tuner's playground settings: temperature {ship.temperature} "
             f"({'greedy; raise it for livelier replies' if ship.temperature == 0 else 'sampled'}), top-p {ship.top_p}, "
             f"repeat penalty {ship.repeat_penalty} over the last {ship.repeat_last_n} tokens, up to "
             f"{ship.num_predict} new tokens, a context of {ship.num_ctx} tokens."]
    if ship.template is None:
        lines += ["", f"Note: {ship.note}."]
    lines += ["", "## llama.cpp", "", "```bash", llama_cli_command(gguf_name, ship),
              f"llama-server -m {gguf_name}   # OpenAI-compatible API on http://127.0.0.1:8080", "```", "",
              "## LM Studio", "",
              f"`lms import {gguf_name}` (or My Models > Import), then chat: LM Studio reads the chat template "
              "from the file."]
    if adapter_name:
        lines += ["", "## The adapter alone", "",
                  f"`{adapter_name}` is the LoRA adapter as a GGUF LoRA, for a machine that keeps the base "
                  f"model ({base_name}) as a GGUF: `llama-cli -m BASE.gguf --lora {adapter_name}`, or in a "
                  f"Modelfile `FROM BASE.gguf` plus `ADAPTER ./{adapter_name}`."]
    if check is not None:
        lines += ["", "## Checked by running it", "", f"{check['sentence']} Expected: {check['expectation']}. "
                  f"Every reply of both sides is in {CHECK_FILE}."]
    lines += ["", "## Data", "", data_sentence(run_dir), "", pii_statement(Run(run_dir).data_report())]
    return "\n".join(lines) + "\n"


def check_prompts(run_dir: Path) -> list[str]:
    """The user prompts the check asks: the run's held-out prompts, as its voice verdict chose them (validation
    conversations whose question occurs nowhere in training); the validation split's when none is new."""
    from tuner.evaluate import load_cases
    from tuner.messages import read_examples
    from tuner.runs import Run
    from tuner.train.voicecheck import held_out_prompts

    run = Run(run_dir)
    cfg = run.config()
    val_file = run.data_file("validation.jsonl")
    val = read_examples(val_file) if val_file.is_file() else []
    held = held_out_prompts(read_examples(run.data_file("train.jsonl")), val, cfg.voice_prompts or FALLBACK_PROMPTS,
                            cfg.seed)
    if held:
        return [p[-1]["content"] for p in held]
    return [c["messages"][-1]["content"] for c in load_cases(run_dir, None, CHECK_PROMPTS)]


def export_gguf(run_dir: str | Path, to_dir: str | Path, quant: str = "q8_0", adapter_gguf: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Export a completed run as GGUF for llama.cpp / Ollama / LM Studio, then check it in llama.cpp.

    Merges the adapter (tuner.export), converts with llama.cpp's converter (f16, q8_0) and
    quantizes with llama.cpp (q4_k_m); writes a Modelfile and README beside it; loads the file in
    llama.cpp with the Modelfile's settings and grades its replies to the run's held-out prompts
    against the merged model's (check_gguf). Returns {"folder", "gguf", "adapter_gguf", "modelfile",
    "readme", "check", "sizes_mb", "peak_rss_mb", "seconds"}.
    Raises TunerError (nothing left under `to_dir`) when a step fails; a failed check is reported, not raised.

    Long on purpose: merge, convert, quantize, write and check run in order in one temporary folder that is renamed only at the end.
    """
    from transformers import AutoConfig, AutoTokenizer

    from tuner.export import MARKER, base_name, export, prepare_target
    from tuner.playground import read_run
    from tuner.runs import Run
    from tuner.train.voicecheck import habit_of
    from tuner.voice import training_replies

    if quant not in QUANTS:
        raise TunerError(f"quant must be one of {', '.join(QUANTS)}, got '{quant}'.")
    report = progress or _no_progress
    started = time.monotonic()
    llama_cpp_version()  # fail before the merge when llama.cpp is missing
    info = read_run(run_dir)
    cfg = Run(info.run_dir).config()
    if adapter_gguf and info.method != "lora":
        raise TunerError(f"Run {info.run_id} was fully fine-tuned: it has no adapter to export alone.")
    out = Path(to_dir).expanduser().resolve()
    prepare_target(out)
    ensure_converter(report)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        report(0.02, "merging the adapter into the base model")
        # float16: the f16 GGUF holds exactly the weights transformers checks; a bf16 base stays bf16 (merged in
        # its own dtype: RAM about its size), which the converter turns into f16 without loss in practice
        from tuner.export import stored_dtype
        from tuner.models import resolve_model

        bf16 = stored_dtype(resolve_model(cfg.base_model)) == "bfloat16"
        merged = export(info.run_dir, tmp / "merged", merge=True, dtype="bfloat16" if bf16 else "float16")
        peak_merge = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak so far
        context = getattr(AutoConfig.from_pretrained(merged), "max_position_embeddings", None)
        ship = shipped_settings(AutoTokenizer.from_pretrained(merged), info.system_prompt, context)
        gguf_name = f"{info.run_id}-{quant}.gguf"
        target = tmp / gguf_name
        metadata = _metadata(info, cfg, Run(info.run_dir).status(), ship)
        if quant == "q4_k_m":
            f16 = tmp / "f16.gguf"
            peak_convert = convert_model(merged, f16, "f16", metadata, report, 0.25, 0.55)
            report(0.55, "quantizing to q4_k_m with llama.cpp")
            quantize(f16, target, quant)
            f16.unlink()
        else:
            peak_convert = convert_model(merged, target, CONVERTER_OUTTYPE[quant], metadata, report, 0.25, 0.6)
        adapter_name = None
        if adapter_gguf:
            report(0.6, "converting the adapter alone to a GGUF LoRA")
            adapter_name = f"{info.run_id}-lora-f16.gguf"
            convert_adapter(info.adapter_dir, Path(resolve_model(cfg.base_model)), tmp / adapter_name, report)
        prompts = check_prompts(info.run_dir)
        report(0.65, f"checking: llama.cpp with the Modelfile's settings and the merged model answer {len(prompts)} "
                     "held-out prompts")
        replies, _ = training_replies(Run(info.run_dir).data_file("train.jsonl"))
        check = check_gguf(target, merged, quant, ship, prompts, habit_of(replies))
        (tmp / CHECK_FILE).write_text(json.dumps(check, indent=2, ensure_ascii=False), encoding="utf-8")
        report(0.95, "writing the Modelfile and README")
        write_modelfile(tmp, gguf_name, ship)
        (tmp / "README.md").write_text(_readme(info.run_dir, gguf_name, ship, check, adapter_name,
                                               base_name(cfg.base_model), info.method), encoding="utf-8")
        shutil.rmtree(merged)
        (tmp / MARKER).write_text(json.dumps({
            "run": info.run_id, "kind": "gguf", "quant": quant, "base_model": base_name(cfg.base_model),
            "llama_cpp_python": llama_cpp_version(), "check_passed": check["passed"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a half-written export is never left under the asked name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(1.0, "done")
    files = [out / gguf_name] + ([out / adapter_name] if adapter_name else [])
    return {"folder": str(out), "gguf": str(out / gguf_name),
            "adapter_gguf": str(out / adapter_name) if adapter_name else None,
            "modelfile": str(out / MODELFILE), "readme": str(out / "README.md"), "check": check,
            "template": ship.note, "sizes_mb": {f.name: round(f.stat().st_size / 2**20, 1) for f in files},
            "peak_rss_mb": {"merge": round(peak_merge), "converter": round(peak_convert),
                            "merge_and_check": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
            "seconds": round(time.monotonic() - started, 1)}
