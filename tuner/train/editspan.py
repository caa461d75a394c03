"""What a preference run learns from a reviewer's edit: a fine-tuning term on the tokens the reviewer changed, and an
anchor on the ones they kept.

A reviewer's edit keeps most of the bot's reply (a closing appended, a word replaced, a sentence cut), so most
tokens of chosen and rejected are the same reply. DPO's log-ratio difference cancels that shared prefix (same
tokens, same context, same log-probabilities), and DPO alone made a 4-bit child loop. The fine-tuning term on the
whole chosen reply (trl's "sft" loss) fixed that but trained the child on every word of a few replies: its answers
to new questions drifted to those replies' content, at +6% to +37% general-text perplexity (bench/PREFERENCE.md,
sessions 13-14). So the default loss is DPO plus:

- `edit_weight` x the mean negative log-likelihood of the chosen replies' edited tokens (difflib over token ids)
  where text was added: from the first difference to the end of the reply, since after it the reply goes on in a
  context the parent never wrote (for a closing appended: the closing and the end of turn; for a cut, the end of
  turn where the bot went on). A replaced word (a
  house term) has none: DPO on the two words alone learns it (EditSpanCollator), and where one token replaces one,
  `edit_weight` x the KL divergence from the parent's next-token distribution there with the old token's
  probability given to the new one (say the new word where the parent would say the old one, and keep all else
  the parent would say there; with it, "I am" for "I'm" kept more of the parent's wording, 0.36-0.44 against
  0.30-0.44, and "grand" for "good" came where it has no place on 3 of 24 new replies instead of 5).
- `anchor_weight` x the mean KL divergence, child from parent, of the next-token distributions where the kept
  tokens (the chosen reply outside its edit, the parent's own words) are predicted: the child may say the edit,
  and nothing else new there. Anchored after an added opening too, a child kept the parent's distribution in a
  context the parent never saw and lost the sign-off the reviewers' replies kept (tests/test_preference.py).
  After a replaced word the reply goes on as the parent wrote it, and is anchored: trained instead from the word
  on, a child answered new questions with the pairs' words ("I am so glad ..."), at +36% general-text perplexity
  from 10 pairs (bench/PREFERENCE.md, session 16). Before a cut the words kept are anchored too: trained instead
  on the whole chosen reply, a child answered 21 of 24 new questions with four of the pairs' sentences ("I'm
  sorry for what you're going through." to 6), and the parent's own first sentences there were +89% perplexity
  under it (+9% anchored; bench/PREFERENCE.md, session 17). Anchored, it shows the cut on fewer new replies (18-19
  of 24 against 23-24), and 1-2 of them end in a token of sixteen commas: neither meets the targets.

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

# bench/preference.py keys its cache of trained children on this: raise it when a change here changes what a child
# learns. (2, session 20, tried and taken back: after a replaced word, the anchor read the parent in its own reply
# rather than in the edited one; bench/PREFERENCE.md.)
LOSS_VERSION = 1


@dataclass(frozen=True)
class Edit:
    """What a reviewer's edit changed in one pair, over token ids (read_edit). `chosen` and `rejected`: 1 on each
    token of the two replies that the edit changed; `replaced`: every change replaces a few tokens by a few others
    (a house term), the reply around them the same; `swaps`: where one token replaced one, the new token's position
    in chosen and the old token's id."""

    chosen: list[int]
    rejected: list[int]
    replaced: bool = False
    swaps: tuple[tuple[int, int], ...] = ()

    @property
    def kept(self) -> list[int]:
        return [1 - x for x in self.chosen]


def read_edit(chosen: list[int], rejected: list[int]) -> Edit:
    """The edit that turns rejected into chosen (difflib over token ids).

    Words replaced: the replacing tokens and the replaced ones; around them the reply goes on as the parent wrote it.
    (An opening is a replacement too when the reply's first word is tokenized anew after it: "Yes" becomes "Happy to
    help! Yes"; longer than what it replaces, it is added text.) Anything else (text added, at the end, the start or
    inside): from the first difference to the end, since after added text the reply goes on in a context the parent
    never wrote, so what the reviewer shows there is learnt, not held to the parent. A cut the same: the chosen
    reply's end of turn where the bot went on, and the rejected's words from there; the words before the cut are
    the parent's own. All 1 for the same reply."""
    ops = [op for op in SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops or not rejected:
        return Edit([1] * len(chosen), [1] * len(rejected))
    if all(tag == "replace" and j2 - j1 <= max(3, 2 * (i2 - i1)) for tag, i1, i2, j1, j2 in ops):
        c, r = [0] * len(chosen), [0] * len(rejected)
        for _tag, i1, i2, j1, j2 in ops:
            c[j1:j2], r[i1:i2] = [1] * (j2 - j1), [1] * (i2 - i1)
        swaps = tuple((j1, rejected[i1]) for _tag, i1, i2, j1, j2 in ops if i2 - i1 == 1 and j2 - j1 == 1)
        return Edit(c, r, replaced=True, swaps=swaps)
    _tag, i1, _i2, j1, _j2 = ops[0]
    return Edit([0] * j1 + [1] * (len(chosen) - j1), [0] * i1 + [1] * (len(rejected) - i1))


def edit_masks(chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int]]:
    """The tokens of chosen and of rejected that the edit changed (read_edit)."""
    edit = read_edit(chosen, rejected)
    return edit.chosen, edit.rejected


def kept_mask(chosen: list[int], rejected: list[int]) -> list[int]:
    """1 on each token of chosen outside its edit (read_edit): the words the reviewer kept, where the child reads
    the parent's own reply (around a replaced word too, and before a cut). None for an added opening."""
    return read_edit(chosen, rejected).kept


@dataclass
class EditSpanCollator(DataCollatorForPreference):
    """trl's preference collator, plus `edit_mask` (the chosen rows' tokens for the fine-tuning term), `kept_mask`
    (their kept tokens) and `swap_from` (where one token replaced one: the old token's id + 1 at the new token, 0
    elsewhere), laid out like the first half of `completion_mask`.

    A pair whose edit replaces words (Edit.replaced) is scored by DPO on them alone (its `completion_mask` rows are
    its edit's tokens) and has no fine-tuning term. DPO there moves probability from the old word to the new one
    where the parent would say the old word; the fine-tuning term raised the new word everywhere ("I am grandma." on
    most new questions after 30 pairs putting "grand" for "good", general-text perplexity +14%), and DPO over the
    words after it, which the two replies say in two contexts, taught one opening for every reply ("I am so glad
    ..."; bench/PREFERENCE.md session 16). For any other pair this is trl's own batch: the words both replies keep
    before the edit cancel in DPO anyway.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        width = out["completion_mask"].shape[1]
        sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)

        def laid_out(ex: dict[str, Any], mask: list[int]) -> list[int]:
            row = [0] * len(ex["prompt_ids"]) + mask
            row = row[sl] if self.max_length is not None else row
            return row + [0] * (width - len(row))

        dtype = out["completion_mask"].dtype
        edit, kept, swaps = [], [], []
        for i, ex in enumerate(examples):
            e = read_edit(ex["chosen_ids"], ex["rejected_ids"])
            kept.append(laid_out(ex, e.kept))
            edit.append(laid_out(ex, [0] * len(e.chosen) if e.replaced else e.chosen))
            swap = [0] * len(e.chosen)
            for j, old in e.swaps:
                swap[j] = old + 1
            swaps.append(laid_out(ex, swap))
            if e.replaced:  # DPO on the words alone
                out["completion_mask"][i] = torch.tensor(laid_out(ex, e.chosen), dtype=dtype)
                out["completion_mask"][len(examples) + i] = torch.tensor(laid_out(ex, e.rejected), dtype=dtype)
        out["edit_mask"], out["kept_mask"] = torch.tensor(edit, dtype=dtype), torch.tensor(kept, dtype=dtype)
        out["swap_from"] = torch.tensor(swaps, dtype=torch.long)
        return out


def _kl_to_reference(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(policy || reference), from each side's log-probabilities over the vocabulary."""
    return (policy.exp() * (policy - reference)).sum(-1).mean()


class EditWeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss adds `edit_weight` x the mean negative log-likelihood of the chosen replies' edited
    tokens, `edit_weight` x the mean KL divergence from the reference's distribution with the old token's probability
    moved to the new one where one token replaced one, and `anchor_weight` x the mean KL divergence, child from
    reference, of the next-token distributions where the chosen replies' kept tokens are predicted. All read the
    policy's and the reference's own forward passes (no extra pass): trl's fused head returns every completion
    token's log-probability, and the backbone's last hidden states give the full distributions where they are needed
    (the LM head on those positions only).

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
        swap_from = inputs.pop("swap_from", None)
        if edit_mask is None or not (self.edit_weight or self.anchor_weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        chosen = edit_mask.shape[0]  # the batch is [chosen, rejected]
        held = kept[..., 1:].bool() if kept is not None and self.anchor_weight else None  # only the anchor reads it
        swapped = swap_from[..., 1:] > 0 if swap_from is not None and self.edit_weight else None
        if swapped is not None and not swapped.any():
            swapped = None
        outputs: list[Any] = []  # the policy's forward, then the reference's (without grad)
        kept_logps: list[torch.Tensor] = []  # the same two, over the vocabulary at the kept positions
        swap_logps: list[torch.Tensor] = []  # ... and where a replaced token is predicted

        def keep_output(_module, _args, output):
            outputs.append(output)

        def keep_kept(head: torch.nn.Module):
            def hook(_module, _args, output):
                # computed here, while trl has the reference's adapter on: the LM head may carry one too
                states = output.last_hidden_state[:chosen, :-1]
                for mask, into in ((held, kept_logps), (swapped, swap_logps)):
                    if mask is not None:
                        hidden = states[mask.to(states.device)]
                        into.append(torch.log_softmax(head(hidden.to(head.weight.dtype)).float(), -1))
            return hook

        # the unwrapped model: trl runs the reference through it too (the parent's adapter copy, "ref"), and a
        # data-parallel wrapper calls it for the policy
        unwrapped = self.accelerator.unwrap_model(model)
        hooks = [unwrapped.register_forward_hook(keep_output)]
        if self.ref_model is not None:
            hooks.append(self.ref_model.register_forward_hook(keep_output))
        if self.anchor_weight or swapped is not None:
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
        if swapped is not None and len(swap_logps) == 2:
            # the parent's distribution with the old token's probability given to the new one: say the new word
            # where the parent would say the old one, and keep everything else the parent would say there
            new = inputs["input_ids"][:chosen, 1:][swapped.to(inputs["input_ids"].device)].to(swap_logps[1].device)
            old = (swap_from[..., 1:][swapped] - 1).to(swap_logps[1].device)
            target = swap_logps[1].detach().exp()
            rows = torch.arange(target.shape[0], device=target.device)
            target[rows, new] += target[rows, old]
            target[rows, old] = 0.0
            moved = (target * (target.clamp(min=1e-12).log() - swap_logps[0])).sum(-1).mean()
            self._metrics[mode]["swap_kl"].append(float(moved.detach()))
            extra = extra + self.edit_weight * moved
        if self.anchor_weight and len(kept_logps) == 2 and kept_logps[0].shape[0]:
            kl = _kl_to_reference(kept_logps[0], kept_logps[1].detach())
            self._metrics[mode]["kept_kl"].append(float(kl.detach()))
            extra = extra + self.anchor_weight * kl
        if return_outputs:
            return loss[0] + extra, loss[1]
        return loss + extra
