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
    if SETTINGS.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, HERE / SETTINGS["adapter"])
    tokenizer = AutoTokenizer.from_pretrained(HERE / SETTINGS["tokenizer"] if SETTINGS.get("tokenizer") else base["id"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return tokenizer, model


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


def build_messages(message: str, history: list[dict[str, Any]], system_prompt: str) -> list[dict[str, str]]:
    """The conversation in the one {"role", "content"} schema the chat template takes."""
    turns = [{"role": m["role"], "content": _text(m["content"])} for m in history if m.get("role") in ("user", "assistant")]
    turns.append({"role": "user", "content": message})
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    # drop the oldest turns until the prompt fits; the system prompt and the new message always stay
    while len(turns) > 1:
        ids = TOKENIZER.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True, return_dict=True)
        if len(ids["input_ids"]) <= MAX_INPUT_TOKENS:
            break
        turns = turns[2:] if len(turns) > 2 else turns[1:]
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
    messages = build_messages(_text(message), history or [], system_prompt or "")
    inputs = TOKENIZER.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(MODEL.device)
    if inputs["input_ids"].shape[1] > MAX_INPUT_TOKENS:
        raise gr.Error(f"The message is too long ({inputs['input_ids'].shape[1]} tokens; at most {MAX_INPUT_TOKENS}).")
    streamer = TextIteratorStreamer(TOKENIZER, skip_prompt=True, skip_special_tokens=True, timeout=300)
    sampling = float(temperature) > 0
    kwargs: dict[str, Any] = {
        **inputs,
        "streamer": streamer,
        "max_new_tokens": max(1, min(int(max_new_tokens), MAX_NEW_TOKENS)),
        "do_sample": sampling,
        "repetition_penalty": float(repetition_penalty),
        "pad_token_id": TOKENIZER.pad_token_id,
    }
    if sampling:
        kwargs.update(temperature=float(temperature), top_p=float(top_p))
        torch.manual_seed(int(GENERATION.get("seed", 0)))
    else:  # greedy: unset the model's own sampling defaults so transformers does not warn about them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    thread = threading.Thread(target=MODEL.generate, kwargs=kwargs, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply
    thread.join()


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
