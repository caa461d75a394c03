"""Every user-facing setting, in one place: dataclasses with defaults and help text.

`TrainConfig` is what a run is re-created from (`runs/<id>/config.yaml`). Presets are named sets
of overrides. Validation happens on creation, with messages that say what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from tuner import limits
from tuner.errors import TunerError


class Quantization(str, Enum):
    AUTO = "auto"  # nf4 for LoRA, none for full fine-tuning (see TrainConfig.quantization)
    NF4 = "nf4"  # QLoRA: 4-bit NormalFloat base + double quantization
    NONE = "none"  # plain LoRA on a 16/32-bit base


class Method(str, Enum):
    LORA = "lora"
    FULL = "full"  # every weight trains; small models only


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a closed-choice setting (an Enum, or `choices` in the field's metadata)."""
    f = next(f for f in fields(cls) if f.name == name)
    kind = typing.get_type_hints(cls).get(name)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return tuple(m.value for m in kind)
    return f.metadata.get("choices")


def _choice_check(obj: Any, name: str) -> tuple[bool, str]:
    allowed = choices(type(obj), name) or ()
    return getattr(obj, name) in allowed, f"{name} is {', '.join(allowed[:-1])} or {allowed[-1]}."


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                         aliases: dict[str, str] | None = None, group: Any = None) -> None:
    """One `--field-name` flag per dataclass field, with its help, type and choices from the field itself.

    Flags default to None, so only what the user typed overrides a preset or a config file
    (config_overrides). Booleans get --name / --no-name. `aliases` adds a second spelling."""
    hints = typing.get_type_hints(cls)
    aliases = aliases or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        flags = [f"--{f.name.replace('_', '-')}"] + ([aliases[f.name]] if f.name in aliases else [])
        default = f.default.value if isinstance(f.default, Enum) else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help
        target = group if group is not None and f.name in ("num_epochs", "max_steps") else parser
        if kind is bool:
            target.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        allowed = choices(cls, f.name)
        convert = str if (isinstance(kind, type) and issubclass(kind, Enum)) else kind
        target.add_argument(*flags, dest=f.name, type=convert, choices=allowed, default=None, help=help_text,
                            metavar=None if allowed else "SECONDS" if f.name.endswith("_s") else f.name.split("_")[-1].upper())


LENGTH_SETTINGS = ("num_epochs", "max_steps")  # how long a run trains, as the user says it
LENGTH_BOUNDS = ("min_steps", "step_limit")  # a preset's floor and cap on its steps


def explicit_length(values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`values` (a preset's or a config file's) with the settings the user gave on top. A run length the user
    gave wins: epochs clear a max_steps they did not give, and either clears the preset's floor and cap on the
    steps (min_steps, step_limit) unless they gave those too, so `--epochs 1` trains one epoch.

    >>> explicit_length({"num_epochs": 1.0, "min_steps": 24, "step_limit": 40}, {"num_epochs": 1.0})
    {'num_epochs': 1.0, 'min_steps': 0, 'step_limit': 0}
    """
    out = {**values, **given}
    if any(given.get(k) is not None for k in LENGTH_SETTINGS):
        if given.get("num_epochs") is not None and given.get("max_steps") is None and "max_steps" in out:
            out["max_steps"] = -1
        for bound in LENGTH_BOUNDS:
            if given.get(bound) is None and bound in out:
                out[bound] = 0
    return out


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields the user set on the command line (see add_config_arguments)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


@dataclass
class ConvertConfig:
    """How exported transcripts become chat examples."""

    system_prompt: str = _f("", "The brand brief, added as a system message to every conversation that has none.")
    val_fraction: float = _f(0.1, "Share of conversations held out for validation (0 to 0.5).")
    seed: int = _f(42, "Seed of the train/validation split; the same seed gives the same split.")
    redact_pii: bool = _f(False, "Replace e-mails, phones, card numbers, IBANs and IPs with [EMAIL]-style placeholders.")
    pii_region: str = _f("US", "Country (ISO code such as US, GB, DE) assumed for phone numbers written without +country.")
    max_length: int = _f(1024, "Longest example in tokens (chat template included).")
    overlong: str = _f("truncate", "What to do with longer examples: 'truncate' (drop the last turns) or 'drop'.")
    assistant_names: list[str] = _f([], "Speaker labels to treat as the assistant (the brand), besides the known ones.")
    user_names: list[str] = _f([], "Speaker labels to treat as the user (the customer), besides the known ones.")
    format: str = _f("auto", "Input format; 'auto' detects it per file.")
    column_map: dict[str, str] = _f({}, "Column names for tabular exports, e.g. {'text': 'body', 'speaker': 'author'}.")
    min_examples: int = _f(10, "Training is blocked below this many usable examples.")
    canaries: int = _f(0, "Plant this many made-up conversations holding a random code in the converted training data "
                       "(never in your files; listed in canaries.json), so the evaluation can tell whether the tuned "
                       "model memorises a secret it saw once. 0: none.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction <= 0.5:
            raise TunerError(f"val_fraction must be between 0 and 0.5, got {self.val_fraction}.")
        if self.overlong not in ("truncate", "drop"):
            raise TunerError(f"overlong must be 'truncate' or 'drop', got '{self.overlong}'.")
        if self.max_length < 32:
            raise TunerError(f"max_length must be at least 32 tokens, got {self.max_length}.")
        if not 0 <= self.canaries <= 20:
            raise TunerError(f"canaries must be between 0 and 20, got {self.canaries}.")


@dataclass
class TrainConfig:
    """One training run. Saved as `config.yaml` in the run folder; a run is re-created from it alone."""

    base_model: str = _f("default", "Base model: 'default' (embedded SmolLM2-135M-Instruct), a local folder or a Hub id.")
    method: Method = _f(Method.LORA, "lora: train small adapter matrices; full: train every weight (small models).")
    quantization: Quantization = _f(Quantization.AUTO, "nf4: load the base in 4 bits (QLoRA: a quarter of the memory, "
                                    "a slightly higher loss); none: 16/32-bit base; auto: nf4 for LoRA, none for full "
                                    "fine-tuning.")
    lora_r: int = _f(16, "LoRA rank: capacity of the adapter. 8-64 is typical.")
    lora_alpha: int = _f(32, "LoRA scaling numerator; alpha/r scales the update. Usually 2 x rank.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input; regularises small datasets but costs a random mask per layer "
                             "per step (measured 10% of a CPU step). Early stopping guards against overfitting instead.")
    target_modules: str = _f("all-linear", "Layers that get adapters: 'all-linear' or comma-separated names (q_proj,v_proj).")
    learning_rate: float = _f(2e-4, "Peak learning rate. LoRA: 1e-4 to 5e-4; full fine-tuning: 1e-5 to 5e-5.")
    num_epochs: float = _f(1.0, "Passes over the training set (ignored when max_steps > 0). Given explicitly, it "
                           "wins over a preset's min_steps and step_limit.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means use num_epochs.")
    min_steps: int = _f(0, "With num_epochs: train at least this many steps, repeating a small dataset until enough "
                        "examples are seen to learn the habit (the voice benchmark: ~200 examples). 0: no minimum.")
    step_limit: int = _f(0, "With num_epochs: train at most this many steps, so a large dataset stays within the "
                         "time the preset promises. 0: no limit.")
    batch_size: int = _f(4, "Examples per device per step.")
    grad_accum: int = _f(1, "Gradient accumulation steps; effective batch = batch_size x grad_accum.")
    max_length: int = _f(1024, "Longest example in tokens; longer ones are truncated.")
    warmup_ratio: float = _f(0.05, "Share of steps spent warming the learning rate up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    seed: int = _f(42, "Seed for initialisation and data order.")
    eval_steps: int = _f(10, "Evaluate on the validation split every N steps (and before training).")
    save_steps: int = _f(10, "Write a checkpoint every N steps.")
    save_total_limit: int = _f(2, "Checkpoints kept (the best one is kept besides these).")
    eval_examples: int = _f(64, "Validation examples scored at each evaluation during training: a fixed, seeded sample "
                            "(0 = all). The result is scored once more on every validation example at the end.")
    eval_share: float = _f(0.1, "Most of the run's time that evaluations during training may take: an evaluation "
                           "due by eval_steps is skipped when it would go over (the last step is always evaluated); "
                           "1 evaluates every eval_steps.")
    save_every_s: float = _f(120.0, "Write a checkpoint at most every N seconds (a new best and the last step are "
                             "always saved), so short runs do not spend their time saving; 0 saves every save_steps.")
    voice_prompts: int = _f(24, "Held-out prompts (asked nowhere in training) that the finished run and the base answer "
                            "for the voice verdict; 8 of them are also asked at each evaluation, so the checkpoint "
                            "kept is the one that speaks most like your agents. 0 turns the voice check off.")
    early_stopping_patience: int = _f(3, "Stop when eval loss has not improved for N evaluations; 0 disables.")
    assistant_only_loss: bool = _f(True, "Learn from the assistant's replies only, not from the customers' lines.")
    packing: bool = _f(True, "Skip computing padding: pack examples into rows (no attention across them) on GPUs with "
                       "flash attention, group examples of similar length elsewhere (measured faster on CPU).")
    gradient_checkpointing: str = _f("auto", "Trade compute for memory: 'auto' (on for CUDA models over 1B), 'on' or 'off'.",
                                     choices=("auto", "on", "off"))
    precision: str = _f("auto", "Compute precision: 'auto' (bf16 on GPUs; on a CPU the faster of bf16 and fp32, "
                        "measured by a few-second probe once per machine), 'bf16', 'fp16' (GPU) or 'fp32'.",
                        choices=("auto", "bf16", "fp16", "fp32"))
    logging_steps: int = _f(1, "Log loss and speed every N steps.")
    preset: str = _f("custom", "The preset these settings started from.")

    def __post_init__(self) -> None:
        from tuner import limits

        try:
            self.method = Method(self.method)
            self.quantization = Quantization(self.quantization)
        except ValueError as exc:
            raise TunerError(f"{exc}. method is lora or full; quantization is auto, nf4 or none.") from None
        if self.method is Method.FULL and self.quantization is Quantization.NF4:
            raise TunerError("Full fine-tuning cannot train 4-bit weights: set quantization to 'none' (or method to 'lora').")
        checks = [
            (self.lora_r >= 1, f"lora_r must be at least 1, got {self.lora_r}."),
            (self.lora_alpha >= 1, f"lora_alpha must be at least 1, got {self.lora_alpha}."),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}."),
            (0.0 < self.learning_rate <= 0.1, f"learning_rate must be in (0, 0.1], got {self.learning_rate}."),
            (self.num_epochs > 0 or self.max_steps > 0, "Set num_epochs > 0 or max_steps > 0."),
            (self.min_steps >= 0 and self.step_limit >= 0, "min_steps and step_limit must be 0 (off) or more."),
            (not (self.step_limit and self.min_steps > self.step_limit),
             f"min_steps ({self.min_steps}) is above step_limit ({self.step_limit})."),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1."),
            (self.max_length >= 32, f"max_length must be at least 32 tokens, got {self.max_length}."),
            (self.max_length <= limits.MAX_EXAMPLE_TOKENS, f"max_length {self.max_length} is over the server limit of "
             f"{limits.MAX_EXAMPLE_TOKENS} tokens per example (TUNER_MAX_EXAMPLE_TOKENS)."),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}."),
            (self.eval_steps >= 1 and self.save_steps >= 1, "eval_steps and save_steps must be at least 1."),
            (self.save_total_limit >= 1, "save_total_limit must be at least 1."),
            (self.voice_prompts >= 0, f"voice_prompts must be 0 (off) or more, got {self.voice_prompts}."),
            (self.eval_examples >= 0, f"eval_examples must be 0 (all) or more, got {self.eval_examples}."),
            (0.0 < self.eval_share <= 1.0, f"eval_share must be in (0, 1], got {self.eval_share}."),
            (self.save_every_s >= 0, f"save_every_s must be 0 or more seconds, got {self.save_every_s}."),
            (self.early_stopping_patience >= 0, "early_stopping_patience must be 0 (off) or more."),
            *(_choice_check(self, name) for name in ("gradient_checkpointing", "precision")),
            (self.save_steps % self.eval_steps == 0,
             f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}), so the best "
             "checkpoint by eval loss is kept."),
        ]
        for ok, message in checks:
            if not ok:
                raise TunerError(message)

    # -- presets and files ------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The preset's settings with `overrides` (the settings the user gave) on top; a length the user
        gave wins over the preset's bounds (explicit_length)."""
        if name not in PRESETS:
            raise TunerError(f"Unknown preset '{name}'. Choose one of: {', '.join(PRESETS)}.")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_dict(explicit_length({**PRESETS[name], "preset": name}, given))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TunerError(f"Unknown training setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in out.items()}

    def save(self, path: str | Path) -> None:
        """Write as YAML (`.yaml`/`.yml`) or JSON."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(path.read_text())
            else:
                values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TunerError(f"{path}: cannot read the training config ({exc}).") from exc
        if not isinstance(values, dict):
            raise TunerError(f"{path}: the training config must be a mapping of setting: value.")
        return cls.from_dict(values)

    def planned_steps(self, n_train: int, processes: int = 1) -> int:
        """Optimizer steps this run takes on `n_train` examples: max_steps when set, else num_epochs passes
        kept within [min_steps, step_limit] (step_plan says which decided).

        >>> TrainConfig(num_epochs=1.0, min_steps=24, step_limit=40, batch_size=8).planned_steps(88)
        24
        """
        return self.step_plan(n_train, processes)["steps"]

    def step_plan(self, n_train: int, processes: int = 1) -> dict[str, Any]:
        """The run's length on `n_train` examples, and why: {steps, by (the setting that decided: max_steps,
        num_epochs, min_steps or step_limit), epoch_steps (steps of num_epochs passes), epochs (passes the
        run really makes), per_step (examples a step)}. The one place a run's length is worked out."""
        per_step = self.batch_size * self.grad_accum * max(processes, 1)
        by_epochs = max(math.ceil(self.num_epochs * n_train / per_step), 1)
        if self.max_steps > 0:
            steps, by = self.max_steps, "max_steps"
        elif self.step_limit and by_epochs > self.step_limit:
            steps, by = self.step_limit, "step_limit"
        elif by_epochs < self.min_steps:
            steps, by = self.min_steps, "min_steps"
        else:
            steps, by = by_epochs, "num_epochs"
        return {"steps": steps, "by": by, "epoch_steps": by_epochs, "per_step": per_step,
                "epochs": steps * per_step / n_train if n_train else None}

    def steps_reason(self, n_train: int, processes: int = 1) -> str:
        """Why the run takes the steps it does, in words (the page's estimate, the CLI)."""
        plan = self.step_plan(n_train, processes)
        passes = f"{self.num_epochs:g} epoch{'' if self.num_epochs == 1 else 's'} of {n_train:,} examples"
        return {
            "max_steps": f"max steps is {self.max_steps}",
            "num_epochs": passes,
            "min_steps": f"{passes} is {plan['epoch_steps']} steps, raised to the preset's minimum of "
                         f"{self.min_steps} steps (min steps: 0 trains exactly the epochs)",
            "step_limit": f"{passes} is {plan['epoch_steps']} steps, cut to the preset's limit of "
                          f"{self.step_limit} steps (step limit: 0 trains every epoch)",
        }[plan["by"]]

    def uses_nf4(self) -> bool:
        """Whether the base is stored in 4-bit NF4: 'auto' is NF4 (QLoRA) for LoRA on a GPU and on a CPU alike
        (the same code path; on this project's 2-core CPUs a 4-bit step runs at the speed of a bf16 one,
        `python -m tuner bench`), and none for full fine-tuning, which trains the base weights themselves."""
        if self.method is Method.FULL:
            return False
        return self.quantization in (Quantization.AUTO, Quantization.NF4)

    def precision_choice(self, dev: str) -> str:
        """'bf16', 'fp16' or 'fp32': the setting, or for 'auto' the GPU's best or this CPU's measured choice."""
        if self.precision != "auto":
            return self.precision
        if dev == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        from tuner.precision import for_model

        return for_model(self.base_model)["choice"]

    @staticmethod
    def help() -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}


# Named starting points. "quick" is sized for about a minute on a laptop CPU with the default model.
DEFAULT_PRESET = "standard"  # the page's choice; `python -m tuner train` without --preset/--config starts here too
PRESETS: dict[str, dict[str, Any]] = {
    # one pass over ~100 short chats: learns a brand's greeting and sign-off (measured on the Kettle sample)
    "quick": {"max_steps": 12, "learning_rate": 1e-3, "warmup_ratio": 0.1, "lora_r": 16, "lora_alpha": 32,
              "batch_size": 8, "max_length": 512, "eval_steps": 6, "save_steps": 6, "early_stopping_patience": 0},
    # the default: one pass sized to the data, at least 24 steps x 8 (the voice benchmark: 12 steps on 400
    # chats learn half a sign-off, 24 steps or one epoch the whole of it, 24/24 unseen prompts, no loops) and at
    # most 40 (a few minutes on a 2-core CPU)
    "standard": {"num_epochs": 1.0, "min_steps": 24, "step_limit": 40, "learning_rate": 1e-3, "warmup_ratio": 0.1,
                 "lora_r": 16, "lora_alpha": 32, "batch_size": 8, "max_length": 512, "eval_steps": 8, "save_steps": 8,
                 "early_stopping_patience": 0},
    "balanced": {"num_epochs": 2.0, "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "batch_size": 4,
                 "grad_accum": 2, "max_length": 1024, "eval_steps": 20, "save_steps": 20},
    "thorough": {"num_epochs": 4.0, "learning_rate": 1e-4, "lora_r": 32, "lora_alpha": 64, "batch_size": 4,
                 "grad_accum": 4, "max_length": 2048, "eval_steps": 25, "save_steps": 25,
                 "early_stopping_patience": 4},
}


@dataclass
class GenerationConfig:
    """Sampling settings shared by every playground column, so a comparison is fair."""

    max_new_tokens: int = _f(min(200, limits.MAX_NEW_TOKENS), "Longest reply in tokens.")
    temperature: float = _f(0.0, "0 is greedy (repeatable); 0.7 is lively.")
    top_p: float = _f(0.9, "Nucleus sampling: keep the smallest set of tokens whose probability sums to this.")
    seed: int = _f(0, "Sampling seed; the same seed and settings give the same replies.")
    repetition_penalty: float = _f(1.1, "Above 1 discourages repeating the same words.")

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= limits.MAX_NEW_TOKENS:
            raise TunerError(f"max_new_tokens must be between 1 and {limits.MAX_NEW_TOKENS}, "
                             f"got {self.max_new_tokens}.")
        if not 0.0 <= self.temperature <= 2.0:
            raise TunerError(f"temperature must be between 0 and 2, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise TunerError(f"top_p must be in (0, 1], got {self.top_p}.")


# Settings measured for one kind of edit, used where the pairs' leading edit is that kind (tuner.edits.Change.kind,
# and its place for added text) and the user left the setting as it was (tuner.edits.settings_for_edit).
# bench/PREFERENCE.md, sessions 18-19, AMD EPYC, one parent and 24 new questions, after 10, 30 and 120 pairs:
# - a cut: with the defaults the child ended its turn after any sentence, even in plain text (general-text
#   perplexity +16%, +27%, +45% on the parent's); with these it shortens 24, 24 and 22 of 24 new replies, none
#   degenerate, at +7.2%, +8.7%, +7.7%, the parent's words +5.6%, +4.9%, +5.1%;
# - a replaced word ("I am" for "I'm"): the defaults left one reply running past the reply budget after 10 and after
#   120 pairs; these: 20 of 20, 20 of 21 and 21 of 21 replies that say either word, none degenerate, the new word
#   put where there was nothing to replace in 1 each (at most 10% may), general text +1.5% to +2.0%. On a second
#   parent, not chosen on, these missed: 1 to 3 replies past the budget; so did the defaults (1 to 3) and every
#   other setting tried there (session 20), on a parent whose own replies leave 1 of 24 past it;
# - a closing (text added at the end; key "added:end"): the defaults left one reply in 24 running past the reply
#   budget after 10 pairs; edit weight 4: 24 of 24 after 10, 30 and 120 pairs, none degenerate, general text
#   -1.0% to +0.6%, the parent's words -0.5% to +0.9%. (A cut's settings put it in 12 of 24 after 30 pairs.)
EDIT_SETTINGS: dict[str, dict[str, float]] = {
    "added:end": {"edit_weight": 4.0},
    "shortened": {"learning_rate": 4e-4, "anchor_weight": 3.0, "num_epochs": 1.0},
    "replaced": {"anchor_weight": 3.0, "num_epochs": 1.0},
}


@dataclass
class PreferenceConfig:
    """Preference tuning of a finished run on reviewers' judgements: a new run linked to its parent, on the
    parent's base and adapter (the same 4-bit base as the parent). Saved in the child run's status."""

    method: str = _f("dpo", "dpo: learn from pairs (a chosen and a rejected reply to one prompt); kto: learn from "
                     "single replies marked good or bad (thumbs), for when there are no pairs.", choices=("dpo", "kto"))
    beta: float = _f(0.1, "How far the child may move from its parent: lower lets the preferences pull harder.")
    loss: str = _f("sigmoid", "dpo: the preference loss (trl's DPOConfig loss_type): sigmoid (DPO), sigmoid_norm (DPO "
                   "on per-token averages), ipo, apo_zero, robust or hinge.",
                   choices=("sigmoid", "sigmoid_norm", "ipo", "apo_zero", "robust", "hinge"))
    sft_weight: float = _f(0.0, "dpo: weight of a plain fine-tuning loss on the whole chosen replies added to the "
                           "preference loss (RPO). Off by default since session 15: it taught the few replies' content "
                           "with the edit (general-text perplexity +6% to +37%); edit_weight and anchor_weight do its "
                           "work. Plain DPO with none of the three made a 4-bit child's replies loop (a closing on 10 "
                           "of 24 new questions with 14 degenerate, bench/PREFERENCE.md session 13).")
    edit_weight: float = _f(2.0, "dpo: weight of a fine-tuning loss on the edited tokens of the chosen replies "
                            "(tuner.train.editspan) where text was added: from the first word where chosen and "
                            "rejected differ to the end of the reply (for a cut: the end of turn where the bot went "
                            "on). A replaced word has none (DPO on the two words alone learns it); where one "
                            "token replaces one, the same weight holds the child there at the parent's distribution with "
                            "the old word's probability given to the new one. Pairs that add a closing train with "
                            "4 unless you set it (EDIT_SETTINGS).")
    anchor_weight: float = _f(1.0, "dpo: weight of a term that holds the child's next-token distributions where the "
                              "chosen replies' kept words are predicted (the words outside the edit) at the parent's: "
                              "the mean KL divergence, child from parent (tuner.train.editspan). Measured with edit_weight "
                              "2 and no whole-reply term on the bot's own replies with a closing appended "
                              "(bench/PREFERENCE.md session 15): 24 of 24 new replies with the closing from 10, 30 and "
                              "120 pairs, none degenerate, general-text perplexity -0.9% to +0.8%; the old default "
                              "(whole replies 1 + edit 1, no anchor): 23, 24 and 24 of 24 at +11%, +6% and +8%. Pairs "
                              "that cut the reply or replace a word train with 3 unless you set it (EDIT_SETTINGS).")
    learning_rate: float = _f(1e-3, "Peak learning rate of the adapter. Measured with bench/preference.py (a closing "
                              "appended to public chit-chat replies): 2e-4 put it in 0 of 24 new replies after 30 "
                              "pairs and 7 of 24 after 120, with replies that never ended; 1e-3 for at least 24 steps "
                              "in 22 of 24 (10 pairs), 24 of 24 (30 and 120 pairs), none degenerate. Pairs that cut the reply train "
                              "with 4e-4 unless you set it (EDIT_SETTINGS).")
    num_epochs: float = _f(1.5, "Passes over the training pairs (ignored when max_steps > 0); pairs that cut the "
                            "reply or replace a word make 1 unless you set it (EDIT_SETTINGS).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means use num_epochs.")
    min_steps: int = _f(24, "With num_epochs: train at least this many steps, repeating a small set of pairs (9 steps "
                        "on 30 pairs taught the closing to 0 of 24 new replies, 24 steps to 24 of 24).")
    batch_size: int = _f(4, "Pairs (or single replies for kto) per step.")
    max_length: int = _f(512, "Longest prompt plus reply in tokens; longer ones are truncated from the left.")
    held_out: float = _f(0.2, "Share of the pairs held out (a seeded split) and scored before and after: "
                         "preference accuracy and reward margin.")
    seed: int = _f(42, "Seed of the held-out split and of training.")
    warmup_ratio: float = _f(0.1, "Share of steps spent warming the learning rate up.")
    save_every_s: float = _f(120.0, "Write a checkpoint at most every N seconds (and at the last step), for resume.")

    def __post_init__(self) -> None:
        checks = [
            _choice_check(self, "method"),
            _choice_check(self, "loss"),
            (self.edit_weight >= 0, f"edit_weight must be 0 (off) or more, got {self.edit_weight}."),
            (self.anchor_weight >= 0, f"anchor_weight must be 0 (off) or more, got {self.anchor_weight}."),
            (self.beta > 0, f"beta must be above 0, got {self.beta}."),
            (self.sft_weight >= 0, f"sft_weight must be 0 (plain DPO) or more, got {self.sft_weight}."),
            (0.0 < self.learning_rate <= 0.1, f"learning_rate must be in (0, 0.1], got {self.learning_rate}."),
            (self.num_epochs > 0 or self.max_steps > 0, "Set num_epochs > 0 or max_steps > 0."),
            (self.min_steps >= 0, f"min_steps must be 0 (off) or more, got {self.min_steps}."),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}."),
            (32 <= self.max_length <= limits.MAX_EXAMPLE_TOKENS,
             f"max_length must be between 32 and {limits.MAX_EXAMPLE_TOKENS} tokens, got {self.max_length}."),
            (0.0 <= self.held_out <= 0.5, f"held_out must be between 0 and 0.5, got {self.held_out}."),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}."),
            (self.save_every_s >= 0, f"save_every_s must be 0 or more seconds, got {self.save_every_s}."),
        ]
        for ok, message in checks:
            if not ok:
                raise TunerError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreferenceConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TunerError(f"Unknown preference setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def planned_steps(self, n_train: int) -> int:
        """Optimizer steps on `n_train` training rows: max_steps when set, else num_epochs passes, at least min_steps.

        >>> PreferenceConfig().planned_steps(8), PreferenceConfig().planned_steps(96), PreferenceConfig(max_steps=5).planned_steps(96)
        (24, 36, 5)
        """
        if self.max_steps > 0:
            return self.max_steps
        return max(math.ceil(self.num_epochs * math.ceil(max(n_train, 1) / self.batch_size)), self.min_steps, 1)
