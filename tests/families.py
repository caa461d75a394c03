"""Tiny random models of the families users bring, each with its real chat template and special tokens.

Built from a transformers config (hidden 64, 2 layers); tokenizers are the embedded SmolLM2 BPE
tokenizer plus the family's special tokens, except Mistral v0.3, which gets a real sentencepiece
tokenizer trained here. Templates are the originals trl ships (`trl/chat_templates/`), Mistral's
from its tokenizer_config.json (tests/data/templates/).

The weights are random except for a wiring that makes greedy replies known in advance: every
layer's output projections are zero (so the last hidden state is the token's own embedding), and
the output head sends the generation prompt's last token to REPLY_WORD, that word to the family's
end-of-turn token, and the end-of-turn token to RUN_ON_WORD. A reply that stops at the end of the
turn is exactly REPLY_WORD; one that runs on shows RUN_ON_WORD.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).parent / "data" / "templates"
REPLY_WORD = "Hello"
RUN_ON_WORD = "Oops"


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the transformers config class
    template: str  # a file in trl/chat_templates/ or tests/data/templates/
    end_of_turn: str
    eos: list[str]  # generation_config.eos_token_id, as tokens
    specials: list[str] = field(default_factory=list)
    bos: str | None = None
    pad: str | None = None
    sentencepiece: bool = False


FAMILIES = [
    Family("llama3.1", "LlamaConfig", "llama3_1.jinja", "<|eot_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>"], bos="<|begin_of_text|>"),
    Family("llama3.2", "LlamaConfig", "llama3_2.jinja", "<|eot_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>"], bos="<|begin_of_text|>"),
    Family("qwen2.5", "Qwen2Config", "qwen2_5.jinja", "<|im_end|>", ["<|im_end|>", "<|endoftext|>"],
           ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>"),
    Family("gemma3", "Gemma3TextConfig", "gemma3.jinja", "<end_of_turn>", ["<eos>", "<end_of_turn>"],
           ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", pad="<pad>"),
    Family("phi3.5", "Phi3Config", "phi3_5.jinja", "<|end|>", ["<|end|>", "<|endoftext|>"],
           ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], bos="<s>"),
    Family("mistral-v0.3", "MistralConfig", "mistral_v0_3.jinja", "</s>", ["</s>"],
           ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]"], bos="<s>", sentencepiece=True),
]
BY_NAME = {f.name: f for f in FAMILIES}
EOS_TEXT = {"llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "qwen2.5": "<|im_end|>", "gemma3": "<eos>",
            "phi3.5": "<|endoftext|>", "mistral-v0.3": "</s>"}  # the tokenizer's eos_token, as the originals set it


def template_text(family: Family) -> str:
    local = TEMPLATES / family.template
    if local.is_file():
        return local.read_text()
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / family.template).read_text()


SP_TEXT = ("Hello there, how can I help you today? Thanks for writing to the support crew. Your order ships "
           "tomorrow. Oops, the kettle leaks: which model is it? The Dome 2 has a two-year warranty. "
           "Kind regards, the team. Where is my parcel? It left the warehouse on Monday.")


def _sentencepiece_tokenizer(family: Family, folder: Path):
    """A real sentencepiece model, trained as Llama's and Mistral's were (BPE, byte fallback, no normalization),
    saved as tokenizer.model, and transformers' Llama tokenizer over its vocabulary and merges (what
    transformers' own converter extracts, which needs protobuf; the test checks both encode alike)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([SP_TEXT] * 20 + SP_TEXT.split()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=family.specials,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece in vocab:  # in id order, which is the merge order of a BPE model
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=False)
    tok.add_special_tokens({"additional_special_tokens": family.specials})
    return tok


def sentencepiece_ids(folder: Path, text: str) -> list[int]:
    """`text` as the sentencepiece model itself encodes it."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


def build_tokenizer(family: Family, folder: Path):
    if family.sentencepiece:
        tok = _sentencepiece_tokenizer(family, folder)
    else:
        from tuner.models import load_tokenizer

        tok = load_tokenizer("default")
        tok.add_special_tokens({"additional_special_tokens": family.specials})
    values = {"eos_token": EOS_TEXT[family.name]}
    if family.bos:
        values["bos_token"] = family.bos
    if family.pad:
        values["pad_token"] = family.pad
    tok.add_special_tokens(values)
    tok.chat_template = template_text(family)
    return tok


def _config(family: Family, tok):
    import transformers

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.convert_tokens_to_ids(family.eos),
           "pad_token_id": tok.pad_token_id}
    common = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, **ids}
    if family.architecture == "Gemma3TextConfig":
        common.update(head_dim=16, sliding_window=128, query_pre_attn_scalar=16)
    if family.architecture == "MistralConfig":
        common.update(sliding_window=None)
    return getattr(transformers, family.architecture)(**common)


def _wire(model, tok, family: Family) -> None:
    """Make greedy replies known: prompt end -> REPLY_WORD -> end of turn -> RUN_ON_WORD (see the module doc)."""
    import torch

    prompt_end = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"][-1]
    word = tok(REPLY_WORD, add_special_tokens=False)["input_ids"][0]
    run_on = tok(RUN_ON_WORD, add_special_tokens=False)["input_ids"][0]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert len({prompt_end, word, run_on, eot}) == 4, (family.name, prompt_end, word, run_on, eot)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        emb[:, :4] = 0.0
        emb[:, 0] = 1.0  # every token leans to the end of turn ...
        emb[prompt_end, 1] = 3.0  # ... except the prompt's end (-> the reply word)
        emb[eot, 2] = 3.0  # and the end of turn itself (-> the run-on word)
        head.zero_()
        # logits of about 2 (the normalized hidden state is about 8 in those dimensions): clear choices, and a
        # loss near that of random guessing, as a real model's first steps on new data
        head[eot, 0] = 0.3
        head[word, 1] = 0.3
        head[run_on, 2] = 0.3


def build_family(family: Family, folder: Path) -> Path:
    """Save a tiny model of `family` (safetensors, tokenizer, generation config) in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = build_tokenizer(family, folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, tok))
    _wire(model, tok, family)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=tok.convert_tokens_to_ids(family.eos))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "tuner_family.json").write_text(json.dumps({"family": family.name}))
    return folder
