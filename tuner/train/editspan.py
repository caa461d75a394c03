"""What a preference run learns from a reviewer's edit: a fine-tuning term on the tokens the reviewer changed, and an
anchor on the ones they kept.

A reviewer's edit keeps most of the bot's reply (a closing appended, a word replaced, a sentence cut), so most
tokens of chosen and rejected are the same reply. DPO's log-ratio difference cancels that shared prefix (same
tokens, same context, same log-probabilities), and DPO alone made a 4-bit child loop. The fine-tuning term on the
whole chosen reply (trl's "sft" loss) fixed that but trained the child on every word of a few replies: its answers
to new questions drifted to those replies' content, at +6% to +37% general-text perplexity (bench/PREFERENCE.md,
sessions 13-14). So the default loss is DPO plus:

- `edit_weight` x the mean negative log-likelihood of the chosen replies' edited tokens: from the first difference
  (difflib over token ids) to the end of the reply, since after it the reply goes on in a context the parent never
  wrote (for a closing appended: the closing and the end of turn). A pair whose chosen reply adds no token of its
  own (a cut, or no change) has its whole chosen reply as the edit.
- `anchor_weight` x the mean KL divergence, child from parent, of the next-token distributions where the kept
  tokens (the chosen reply before its edit, the parent's own words) are predicted: the child may say the edit,
  and nothing else new there. Anchored after an added opening too, a child kept the parent's distribution in a
  context the parent never saw and lost the sign-off the reviewers' replies kept (tests/test_preference.py).

The edited tokens alone are not enough: trained on them only, a child answered every new question with the closing
alone, or ended its turn before its first word (session 14); something must say where the edit goes. Holding the
kept tokens' own log-probabilities (a squared log-ratio) did not (the closing alone on 13 of 24 new replies,
session 15); the KL over the whole vocabulary does.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference


def edit_masks(chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int]]:
    """1 on each token of chosen and of rejected from their first difference (difflib over token ids) to the end:
    after it the reply goes on in a context the parent never wrote, so what the reviewer shows there is learnt, not
    held to the parent. All 1 when chosen adds no token of its own (a cut, or the same reply)."""
    ops = [op for op in SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not any(j2 > j1 for _tag, _i1, _i2, j1, j2 in ops) or not rejected:
        return [1] * len(chosen), [1] * len(rejected)
    _tag, i1, _i2, j1, _j2 = ops[0]
    return [0] * j1 + [1] * (len(chosen) - j1), [0] * i1 + [1] * (len(rejected) - i1)


def kept_mask(chosen: list[int], rejected: list[int]) -> list[int]:
    """1 on each token of chosen before its edit (edit_masks): the words the reviewer kept, where the child reads
    the parent's own reply. None for a cut, whose whole chosen reply is the edit, nor for an added opening."""
    return [1 - x for x in edit_masks(chosen, rejected)[0]]


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


def _kl_to_reference(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(policy || reference), from each side's log-probabilities over the vocabulary."""
    return (policy.exp() * (policy - reference)).sum(-1).mean()


class EditWeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss adds `edit_weight` x the mean negative log-likelihood of the chosen replies' edited
    tokens, and `anchor_weight` x the mean KL divergence, child from reference, of the next-token distributions where
    the chosen replies' kept tokens are predicted. Both read the policy's and the reference's own forward passes (no
    extra pass): trl's fused head returns every completion token's log-probability, and the backbone's last hidden
    states give the kept positions' full distributions (the LM head on those positions only).

    The anchor is over the whole vocabulary on purpose: holding the kept tokens' own log-probabilities (the squared
    log-ratio, tried in session 15) let the edit's words rise at the start of a reply, and 13 of 24 new replies were
    the closing alone; the reverse KL makes any token the parent would not say there cost."""

    def __init__(self, *args: Any, edit_weight: float, anchor_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.edit_weight, self.anchor_weight = edit_weight, anchor_weight
        if anchor_weight and self.precompute_ref_logps:
            raise ValueError("anchor_weight needs the reference's forward pass: set precompute_ref_log_probs=False.")
        if type(self.data_collator) is DataCollatorForPreference:  # trl's own, with the pad token it chose
            self.data_collator = EditSpanCollator(**vars(self.data_collator))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        edit_mask, kept = inputs.pop("edit_mask", None), inputs.pop("kept_mask", None)
        if edit_mask is None or not (self.edit_weight or self.anchor_weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        chosen = edit_mask.shape[0]  # the batch is [chosen, rejected]
        held = kept[..., 1:].bool() if kept is not None else None
        outputs: list[Any] = []  # the policy's forward, then the reference's (without grad)
        kept_logps: list[torch.Tensor] = []  # the same two, over the vocabulary at the kept positions

        def keep_output(_module, _args, output):
            outputs.append(output)

        def keep_kept(head: torch.nn.Module):
            def hook(_module, _args, output):
                # computed here, while trl has the reference's adapter on: the LM head may carry one too
                hidden = output.last_hidden_state[:chosen, :-1][held.to(output.last_hidden_state.device)]
                kept_logps.append(torch.log_softmax(head(hidden.to(head.weight.dtype)).float(), -1))
            return hook

        # the unwrapped model: trl runs the reference through it too (the parent's adapter copy, "ref"), and a
        # data-parallel wrapper calls it for the policy
        unwrapped = self.accelerator.unwrap_model(model)
        hooks = [unwrapped.register_forward_hook(keep_output)]
        if self.ref_model is not None:
            hooks.append(self.ref_model.register_forward_hook(keep_output))
        if self.anchor_weight:
            for m in [unwrapped] + ([self.ref_model] if self.ref_model is not None else []):
                causal = m.get_base_model() if hasattr(m, "get_base_model") else m
                hooks.append(causal.base_model.register_forward_hook(keep_kept(causal.get_output_embeddings())))
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        mode = "train" if self.model.training else "eval"
        extra = 0.0
        if self.edit_weight:
            mask = edit_mask[..., 1:].to(outputs[0].log_probs.device)
            logps = outputs[0].log_probs[:chosen, -mask.shape[1]:]
            nll = -(logps * mask).sum() / mask.sum().clamp(min=1)
            self._metrics[mode]["edit_nll"].append(float(nll.detach()))
            extra = extra + self.edit_weight * nll
        if self.anchor_weight and len(kept_logps) == 2 and kept_logps[0].shape[0]:
            kl = _kl_to_reference(kept_logps[0], kept_logps[1].detach())
            self._metrics[mode]["kept_kl"].append(float(kl.detach()))
            extra = extra + self.anchor_weight * kl
        if return_outputs:
            return loss[0] + extra, loss[1]
        return loss + extra
