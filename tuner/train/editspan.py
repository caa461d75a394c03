"""A fine-tuning term on what the reviewer changed: the tokens where a pair's chosen and rejected replies differ.

A reviewer's edit keeps most of the bot's reply (a closing appended, a word replaced, a sentence cut), so most
tokens of chosen and rejected are the same reply. DPO's log-ratio difference cancels that shared prefix (same
tokens, same context, same log-probabilities); the fine-tuning term on the chosen reply (trl's "sft" loss) does
not: it trains the child on every word of a few replies, and the child's answers to new questions drift towards
those replies' content (bench/PREFERENCE.md, sessions 13-14). `PreferenceConfig.edit_weight` adds a fine-tuning
term on the edited tokens only, so the whole-reply term can be lighter.

The whole-reply term cannot go: trained on the edited tokens alone (the closing and the end of turn after it;
the end of turn where a sentence was cut), a child answered every new question with the closing alone, or ended
its turn before its first word (session 14): the rest of the chosen reply is what says where the edit goes.

The edited tokens: each difference (difflib over token ids) and the token right after it (where the reply goes
on, or ends, in the new context). A pair whose chosen reply adds no token of its own (a cut, or no change) has
its whole chosen reply as the edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference


def _differences(chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int], bool]:
    """1 on each token of chosen and of rejected inside a difference between them, and on the token after it;
    and whether chosen adds a token of its own."""
    c, r = [0] * len(chosen), [0] * len(rejected)
    added = False
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        added |= j2 > j1
        c[j1:min(j2 + 1, len(chosen))] = [1] * (min(j2 + 1, len(chosen)) - j1)
        r[i1:min(i2 + 1, len(rejected))] = [1] * (min(i2 + 1, len(rejected)) - i1)
    return c, r, added


def edit_masks(chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int]]:
    """1 on each token of chosen and of rejected inside a difference between them, and on the token after it;
    all 1 when chosen adds no token of its own (a cut, or the same reply)."""
    c, r, added = _differences(chosen, rejected)
    if not added or not any(r):
        return [1] * len(chosen), [1] * len(rejected)
    return c, r


def kept_mask(chosen: list[int], rejected: list[int]) -> list[int]:
    """1 on each token of chosen that the reviewer kept: outside every difference and the token after it (for a
    cut, the kept sentences; the end of turn after them is the edit)."""
    return [1 - x for x in _differences(chosen, rejected)[0]]


@dataclass
class EditSpanCollator(DataCollatorForPreference):
    """trl's preference collator, plus `edit_mask` (the chosen rows' edited tokens, edit_masks) and `kept_mask`
    (their kept tokens, kept_mask), laid out like the first half of `completion_mask`."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        width = out["completion_mask"].shape[1]
        sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
        for name, mask_of in (("edit_mask", lambda c, r: edit_masks(c, r)[0]), ("kept_mask", kept_mask)):
            rows = []
            for ex in examples:
                row = [0] * len(ex["prompt_ids"]) + mask_of(ex["chosen_ids"], ex["rejected_ids"])
                if self.max_length is not None:
                    row = row[sl]
                rows.append(row + [0] * (width - len(row)))
            out[name] = torch.tensor(rows, dtype=out["completion_mask"].dtype)
        return out


class EditWeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss adds `edit_weight` x the mean negative log-likelihood of the chosen replies' edited
    tokens, and `anchor_weight` x the mean squared log-ratio (child against reference) of their kept tokens, read
    from the policy's and the reference's own forward passes (no extra pass): trl's fused head returns every
    completion token's log-probability. The anchor holds the words the reviewer kept at the parent's probability,
    where the whole-reply fine-tuning term raises them (and the child learns the few replies' content)."""

    def __init__(self, *args: Any, edit_weight: float, anchor_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.edit_weight, self.anchor_weight = edit_weight, anchor_weight
        if anchor_weight and self.precompute_ref_logps:
            raise ValueError("anchor_weight needs the reference's per-token log-probabilities: "
                             "set precompute_ref_log_probs=False.")
        if type(self.data_collator) is DataCollatorForPreference:  # trl's own, with the pad token it chose
            self.data_collator = EditSpanCollator(**vars(self.data_collator))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        edit_mask, kept = inputs.pop("edit_mask", None), inputs.pop("kept_mask", None)
        if edit_mask is None or not (self.edit_weight or self.anchor_weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        seen: list[Any] = []  # the policy's forward, then the reference's (without grad)

        def keep(_module, _args, output):
            seen.append(output)

        # the unwrapped model: trl runs the reference through it too (the parent's adapter copy, "ref"), and a
        # data-parallel wrapper calls it for the policy
        hooked = [self.accelerator.unwrap_model(model)] + ([self.ref_model] if self.ref_model is not None else [])
        hooks = [m.register_forward_hook(keep) for m in hooked]
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        mode = "train" if self.model.training else "eval"
        mask = edit_mask[..., 1:].to(seen[0].log_probs.device)
        logps = seen[0].log_probs[: mask.shape[0], -mask.shape[1]:]  # the chosen rows: the batch is [chosen, rejected]
        extra = 0.0
        if self.edit_weight:
            nll = -(logps * mask).sum() / mask.sum().clamp(min=1)
            self._metrics[mode]["edit_nll"].append(float(nll.detach()))
            extra = extra + self.edit_weight * nll
        if self.anchor_weight:
            held = kept[..., 1:].to(logps.device)
            ref = seen[1].log_probs[: held.shape[0], -held.shape[1]:].detach()
            drift = (((logps - ref) * held) ** 2).sum() / held.sum().clamp(min=1)
            self._metrics[mode]["kept_drift"].append(float(drift.detach()))
            extra = extra + self.anchor_weight * drift
        if return_outputs:
            return loss[0] + extra, loss[1]
        return loss + extra
