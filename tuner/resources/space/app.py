"""Chat with a model fine-tuned by tuner: a standalone Gradio Space.

`python -m tuner publish` copies this file, unchanged, as `app.py` into the published folder,
next to `space_config.json` (title, system prompt, sampling defaults, examples, where the weights
are) and the weights themselves. It must not import `tuner`: the folder runs on its own with only
its requirements.txt installed. Run it with `python app.py` (http://127.0.0.1:7860).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

HERE = Path(__file__).resolve().parent
SETTINGS: dict[str, Any] = json.loads((HERE / "space_config.json").read_text(encoding="utf-8"))
GENERATION: dict[str, Any] = SETTINGS["generation"]
MAX_NEW_TOKENS = int(os.environ.get("MAX_NEW_TOKENS", SETTINGS.get("max_new_tokens_limit", 1024)))
MAX_INPUT_TOKENS = int(os.environ.get("MAX_INPUT_TOKENS", SETTINGS.get("max_input_tokens", 2048)))
QUEUE_SIZE = int(os.environ.get("QUEUE_SIZE", 16))


def _dtype() -> torch.dtype:
    # fp32 on CPU is both the fastest there and what `tuner chat` uses, so greedy replies match
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load() -> tuple[Any, Any]:
    """The tokenizer and the model (base + adapter, or the merged model), in eval mode."""
    base = SETTINGS["base"]
    kwargs: dict[str, Any] = {"dtype": _dtype(), "trust_remote_code": False}
    if base["kind"] == "gguf":
        # the embedded default base ships as its small GGUF file; transformers dequantizes it here
        gguf = HERE / base["path"]
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        model.hf_quantizer = None  # the weights are plain tensors now; peft must not treat them as quantized
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    elif base["kind"] == "folder":
        model = AutoModelForCausalLM.from_pretrained(HERE / base["path"], use_safetensors=True, **kwargs)
    else:  # a Hub id, fetched (or preloaded by the Space) at start
        model = AutoModelForCausalLM.from_pretrained(base["id"], use_safetensors=True, **kwargs)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(HERE / SETTINGS["tokenizer"])  # the base's, saved with the weights
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    SETTINGS["end_ids"] = _end_of_turn_ids(tokenizer, model)
    if SETTINGS.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, HERE / SETTINGS["adapter"], is_trainable=False)
    model.eval()
    return tokenizer, model


def _end_of_turn_ids(tokenizer: Any, model: Any) -> list[int]:
    """Stop at the model's end-of-sequence and at the chat template's end-of-turn markers."""
    ids: set[int] = set()
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = str(tokenizer.chat_template)
    for marker in SETTINGS.get("end_of_turn_markers", []):
        if marker in template:
            tid = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return sorted(ids)


TOKENIZER, MODEL = load()


def _text(content: Any) -> str:
    """Gradio hands message content over as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def _prompt_tokens(messages: list[dict[str, str]]) -> int:
    enc = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(enc["input_ids"])


def build_messages(message: str, history: list[dict[str, Any]], system_prompt: str, limit: int) -> list[dict[str, str]]:
    """The conversation in the one {"role", "content"} schema the chat template takes, within `limit` tokens."""
    turns = [{"role": m["role"], "content": _text(m["content"])} for m in history if m.get("role") in ("user", "assistant")]
    turns.append({"role": "user", "content": message})
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    # drop the oldest turns until the prompt fits; the system prompt and the new message always stay
    while len(turns) > 1 and _prompt_tokens(system + turns) > limit:
        turns.pop(0)
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with the user
            turns.pop(0)
    if _prompt_tokens(system + turns) > limit:
        raise gr.Error(f"The message is too long for this model: keep it under about {limit} tokens.")
    return system + turns


def respond(
    message: str,
    history: list[dict[str, Any]],
    system_prompt: str = SETTINGS.get("system_prompt", ""),
    max_new_tokens: int = GENERATION["max_new_tokens"],
    temperature: float = GENERATION["temperature"],
    top_p: float = GENERATION["top_p"],
    repetition_penalty: float = GENERATION["repetition_penalty"],
) -> Iterator[str]:
    """Stream the tuned model's reply; temperature 0 is greedy (the same reply every time)."""
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    # the prompt budget leaves room for the reply inside the model's context window
    context = getattr(MODEL.config, "max_position_embeddings", None) or MAX_INPUT_TOKENS + max_new_tokens
    limit = max(min(MAX_INPUT_TOKENS, int(context) - max_new_tokens), 16)
    messages = build_messages(_text(message), history or [], system_prompt or "", limit)
    inputs = TOKENIZER.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(MODEL.device)
    end_ids = SETTINGS["end_ids"]
    streamer = TextIteratorStreamer(TOKENIZER, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs: dict[str, Any] = {
        **inputs,
        "streamer": streamer,
        "max_new_tokens": max_new_tokens,
        "repetition_penalty": float(repetition_penalty),
        "eos_token_id": end_ids,
        "pad_token_id": TOKENIZER.pad_token_id,
    }
    if float(temperature) > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:  # greedy: repeatable
        kwargs["do_sample"] = False
    done: dict[str, Any] = {}

    def work() -> None:
        try:
            torch.manual_seed(int(GENERATION.get("seed", 0)))
            with torch.inference_mode():
                done["ids"] = MODEL.generate(**kwargs)
        except Exception as exc:  # shown to the user below instead of a stream that never ends
            done["error"] = exc
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    thread.join()
    if "error" in done:
        raise gr.Error(f"Generation failed: {type(done['error']).__name__}: {done['error']}")
    # the exact reply: the new tokens up to the first end-of-turn token, decoded once
    new = done["ids"][0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in end_ids), len(new))
    final = TOKENIZER.decode(new[:end], skip_special_tokens=True)
    if final != reply:
        yield final


def build_demo() -> gr.Blocks:
    settings = [
        gr.Textbox(SETTINGS.get("system_prompt", ""), label="System prompt", lines=3),
        gr.Slider(1, MAX_NEW_TOKENS, value=GENERATION["max_new_tokens"], step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, value=GENERATION["temperature"], step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=GENERATION["top_p"], step=0.05, label="Top-p"),
        gr.Slider(1.0, 2.0, value=GENERATION["repetition_penalty"], step=0.05, label="Repetition penalty"),
    ]
    return gr.ChatInterface(
        respond,
        title=SETTINGS.get("title") or None,
        description=SETTINGS.get("description") or None,
        examples=[[e] for e in SETTINGS.get("examples", [])] or None,
        cache_examples=False,  # examples run on click, never at start-up
        additional_inputs=settings,
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        api_name="chat",
        concurrency_limit=1,  # one generation at a time keeps a small CPU Space responsive
    )


if __name__ == "__main__":
    build_demo().queue(max_size=QUEUE_SIZE).launch()
