"""`python -m tuner export`: a run to a folder or the Hub (tuner.export: the adapter or the merged model, as
safetensors) or to llama.cpp / Ollama (tuner.gguf). The command sits above both, so neither imports the other's
caller: tuner.gguf builds on tuner.export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tuner.errors import TunerError
from tuner.export import DTYPES, REPO_ID_RE, export, push
from tuner.gguf import export_gguf


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="Run id, or path to a run folder.")
    parser.add_argument("--to", required=True, help="Folder to write (new or empty, or an earlier export).")
    parser.add_argument("--merge", action="store_true", help="Merge the adapter into the base: a standalone model.")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="Weights dtype of a merged model.")
    parser.add_argument("--push", default=None, metavar="REPO_ID", help="Also push to this Hub model repository.")
    parser.add_argument("--token", default=None,
                        help="Hub token for --push (default: $HF_TOKEN; prefer the variable: arguments show in `ps`).")
    parser.add_argument("--public", action="store_true", help="Create the Hub repository public (default private).")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="gguf: the merged model for llama.cpp / Ollama / LM Studio, with a Modelfile, "
                             "checked by running it in llama.cpp.")
    parser.add_argument("--quant", choices=("f16", "q8_0", "q4_k_m"), default="q8_0",
                        help="GGUF weights: f16 (exact), q8_0 (half the size, near-exact), q4_k_m (smallest).")
    parser.add_argument("--lora-gguf", action="store_true",
                        help="With --format gguf: also write the adapter alone as a GGUF LoRA.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON (--format gguf).")


def _cli_gguf(args: argparse.Namespace, token: str | None) -> int:
    if args.push and not REPO_ID_RE.match(args.push):  # checked before the minutes the export takes
        raise TunerError(f"'{args.push}' is not a model repository id; use the form 'your-name/model-name'.")
    if args.push and not token:
        raise TunerError("Pushing to the Hub needs a token with write access (--token, or HF_TOKEN in the "
                         "environment).")

    shown: list[str] = []

    def progress(fraction: float, message: str) -> None:
        line = f"[{fraction:4.0%}] {message}"
        if not shown or shown[-1] != line:
            shown.append(line)
            print(line, file=sys.stderr, flush=True)

    result = export_gguf(args.run, args.to, quant=args.quant, adapter_gguf=args.lora_gguf, progress=progress)
    from tuner import audit

    audit.record_cli("export", args.run, f"command line, GGUF {args.quant}")
    if args.push:
        assert token is not None
        result["pushed"] = push(Path(result["folder"]), args.push, token, private=not args.public)
    check = result["check"]
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(f"exported to {result['gguf']} (Ollama: ollama create NAME -f {result['modelfile']})")
        print(f"check in llama.cpp: {check['sentence']}")
    if not check["passed"]:
        print(f"The GGUF does not answer like the merged model ({check['expectation']} expected): every reply is "
              f"in {result['folder']}/check.json.", file=sys.stderr)
        return 1
    return 0


def cli(args: argparse.Namespace) -> int:
    token = (args.token or os.environ.get("HF_TOKEN")) if args.push else None
    if args.format == "gguf":
        return _cli_gguf(args, token)
    out = export(args.run, args.to, merge=args.merge, push_to=args.push, token=token, private=not args.public,
                 dtype=args.dtype)
    from tuner import audit

    audit.record_cli("push" if args.push else "export", args.run, f"command line, {'merged' if args.merge else 'adapter'}"
                     + (f" to {args.push}" if args.push else ""))
    print(f"exported to {out}")
    if args.push:
        print(f"pushed to https://huggingface.co/{args.push}")
    return 0
