"""The fine-tuning term on the reviewers' edit (PreferenceConfig.edit_weight, tuner.train.editspan): which tokens of
a pair it sees, on the real tokenizer and trl's own collator, and what it adds to trl's DPO loss."""

from __future__ import annotations

import pytest
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tuner.train.editspan import EditSpanCollator, edit_masks, kept_mask

QUESTION = [{"role": "user", "content": "Can I change my delivery address?"}]
REPLY = "Yes, open your order and pick a new address before it ships."


def tokenized(tokenizer, chosen: str, rejected: str) -> dict[str, list[int]]:
    """A pair as trl tokenizes it: the prompt, then each reply's tokens after it (end of turn included)."""
    def ids(messages, **kw):
        out = tokenizer.apply_chat_template(messages, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    prompt = ids(QUESTION, add_generation_prompt=True)
    c = ids(QUESTION + [{"role": "assistant", "content": chosen}])
    r = ids(QUESTION + [{"role": "assistant", "content": rejected}])
    assert c[:len(prompt)] == prompt and r[:len(prompt)] == prompt
    return {"prompt_ids": prompt, "chosen_ids": c[len(prompt):], "rejected_ids": r[len(prompt):]}


def seen(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize(("chosen", "rejected", "chosen_seen", "rejected_seen"), [
    # a closing appended: its words and the end of turn after them; on the rejected side, the end of turn it replaced
    (REPLY + " Cheers from the Kettle crew!", REPLY, " Cheers from the Kettle crew!<|im_end|>\n", "<|im_end|>\n"),
    # a house term: the new word against the old one; the reply around them is the parent's
    (REPLY.replace("new", "fresh"), REPLY, " fresh", " new"),
    # two words replaced: each
    (REPLY.replace("new", "fresh").replace("order", "parcel"), REPLY, " parcel fresh", " order new"),
    # an opening added: from it to the end (the reply goes on in a context the parent never wrote)
    ("Happy to help! " + REPLY, REPLY, "Happy to help! " + REPLY + "<|im_end|>\n", REPLY + "<|im_end|>\n"),
    # a cut: the end of turn where the bot went on, against the words it went on with
    ("Yes, open your order.", "Yes, open your order. Pick a new address before it ships.", "<|im_end|>\n",
     " Pick a new address before it ships.<|im_end|>\n"),
])
def test_the_losses_see_what_the_reviewer_changed_and_where_the_reply_goes_on(tokenizer, chosen, rejected,
                                                                             chosen_seen, rejected_seen):
    pair = tokenized(tokenizer, chosen, rejected)
    c, r = edit_masks(pair["chosen_ids"], pair["rejected_ids"])
    assert seen(tokenizer, pair["chosen_ids"], c) == chosen_seen
    assert seen(tokenizer, pair["rejected_ids"], r) == rejected_seen


def test_an_unchanged_pair_keeps_its_whole_replies(tokenizer):
    pair = tokenized(tokenizer, REPLY, REPLY)  # nothing changed: nothing to narrow to
    c, r = edit_masks(pair["chosen_ids"], pair["rejected_ids"])
    assert all(c) and all(r)


@pytest.mark.parametrize(("chosen", "rejected", "kept"), [
    # a closing appended: the whole reply the bot wrote, not the closing nor the end of turn after it
    (REPLY + " Cheers from the Kettle crew!", REPLY, REPLY),
    # a house term: the words around it
    (REPLY.replace("new", "fresh"), REPLY, "Yes, open your order and pick a address before it ships.<|im_end|>"),
    # an opening added: none (the whole reply after it is in a context the parent never wrote)
    ("Happy to help! " + REPLY, REPLY, ""),
    # a cut: the sentence kept (trained on instead, a child answered most new questions with one of the pairs'
    # sentences, bench/PREFERENCE.md session 17)
    ("Yes, open your order.", "Yes, open your order. Pick a new address before it ships.", "Yes, open your order."),
])
def test_the_anchor_holds_the_words_the_reviewer_kept(tokenizer, chosen, rejected, kept):
    pair = tokenized(tokenizer, chosen, rejected)
    assert seen(tokenizer, pair["chosen_ids"], kept_mask(pair["chosen_ids"], pair["rejected_ids"])).strip() == kept


def test_the_collator_adds_the_chosen_rows_edits_to_trls_batch_and_changes_nothing_else(tokenizer):
    pairs = [tokenized(tokenizer, REPLY + " Cheers from the Kettle crew!", REPLY),
             tokenized(tokenizer, "Yes, open your order.", REPLY)]
    plain = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=512)
    a, b = plain(pairs), EditSpanCollator(**vars(plain))(pairs)
    assert set(b) - set(a) == {"edit_mask", "kept_mask", "swap_from"}
    assert all(a[k].equal(b[k]) for k in a)  # same tokens, padding and completion: the DPO loss is unchanged
    chosen_rows = a["completion_mask"][: len(pairs)]
    assert (b["edit_mask"] <= chosen_rows).all() and (b["kept_mask"] <= chosen_rows).all()  # no prompt, no padding
    closing = tokenizer.encode(" Cheers from the Kettle crew!<|im_end|>\n", add_special_tokens=False)
    # the closing pair: its closing and the end of turn after it; the cut: its full stop and end of turn, where the
    # bot went on with " and pick a new address ..."
    cut = tokenizer.encode(".<|im_end|>\n", add_special_tokens=False)
    assert b["edit_mask"].sum(1).tolist() == [len(closing), len(cut)]
    # truncated like trl's: a pair longer than max_length keeps the mask of the tokens that remain
    short = EditSpanCollator(**{**vars(plain), "max_length": len(pairs[0]["prompt_ids"]) + 3})(pairs[:1])
    assert short["edit_mask"].shape == short["kept_mask"].shape == short["input_ids"][:1].shape


def test_dpo_alone_scores_a_replaced_word_and_every_other_pair_as_trl_does(tokenizer):
    pairs = [tokenized(tokenizer, REPLY.replace("new", "fresh"), REPLY),
             tokenized(tokenizer, REPLY + " Cheers from the Kettle crew!", REPLY),
             tokenized(tokenizer, "Happy to help! " + REPLY, REPLY)]
    plain = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=512)
    a, b = plain(pairs), EditSpanCollator(**vars(plain))(pairs)

    def scored(batch, row):
        return tokenizer.decode(batch["input_ids"][row][batch["completion_mask"][row].bool()])

    # the house term: " fresh" against " new", not the words the two replies go on with in two contexts
    assert (scored(b, 0), scored(b, 3)) == (" fresh", " new")
    # and no fine-tuning term on it (it raised the new word everywhere); the words around it are held
    assert b["edit_mask"][0].sum() == 0 and b["kept_mask"][0].sum() == a["completion_mask"][0].sum() - 1
    # a closing or an opening: trl's own rows (the words both keep before the edit cancel in DPO anyway)
    assert all(scored(a, i) == scored(b, i) for i in (1, 2, 4, 5))
    assert a["input_ids"].equal(b["input_ids"]) and a["attention_mask"].equal(b["attention_mask"])


def test_the_edit_and_anchor_terms_add_their_weights_times_their_losses_to_trls_dpo_loss(tokenizer, tmp_path):
    """On a tiny random model with the real tokenizer: EditWeightedDPOTrainer's loss is trl's DPO loss (with its
    fine-tuning term) plus edit_weight x the mean negative log-likelihood of the chosen replies' edited tokens, plus
    anchor_weight x the mean KL divergence (policy from reference) of the next-token distributions at their kept
    tokens, plus edit_weight x the mean KL divergence from the reference's distribution with the old word's
    probability given to the new one where a word was replaced, computed here from the two models' logits."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from datasets import Dataset
    from tuner.train.editspan import EditWeightedDPOTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    rows = [{"prompt": QUESTION, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": REPLY}]}
            for c in (REPLY + " Cheers from the Kettle crew!", "Yes, open your order.", REPLY.replace("new", "fresh"))]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, 1.0], max_length=512, report_to="none", use_cpu=True)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the child has moved from its parent: the anchor has something to hold
    kw = dict(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    weighted, plain = EditWeightedDPOTrainer(**kw, edit_weight=0.7, anchor_weight=3.0), DPOTrainer(**kw)
    batch = weighted._prepare_inputs(next(iter(weighted.get_train_dataloader())))
    assert {"edit_mask", "kept_mask", "swap_from"} <= set(batch)
    n = len(rows)  # the chosen rows come first

    def next_token_logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.log_softmax(logits[:n, :-1].float(), -1)

    with torch.no_grad():
        total = weighted.compute_loss(weighted.model, dict(batch))
        dpo = plain.compute_loss(plain.model, {k: v for k, v in batch.items()
                                               if k not in ("edit_mask", "kept_mask", "swap_from")})
        policy, reference = next_token_logps(weighted.model), next_token_logps(ref)
    mask, kept = batch["edit_mask"][:, 1:], batch["kept_mask"][:, 1:].bool()
    nll = -(policy.gather(-1, batch["input_ids"][:n, 1:, None])[..., 0] * mask).sum() / mask.sum()
    p, r = policy[kept], reference[kept]
    kl = (p.exp() * (p - r)).sum(-1).mean()
    assert float(kl) > 1e-4  # the policy moved: the test can tell the anchor from nothing
    # the replaced word: where " fresh" is said, the parent's distribution with " new"'s probability moved to it
    at = batch["swap_from"][:, 1:] > 0
    assert int(at.sum()) == 1 and tokenizer.decode(batch["swap_from"][:, 1:][at] - 1) == " new"
    target = reference[at].exp()
    fresh = batch["input_ids"][:n, 1:][at]
    assert tokenizer.decode(fresh) == " fresh"
    target[0, fresh] += target[0, batch["swap_from"][:, 1:][at] - 1]
    target[0, batch["swap_from"][:, 1:][at] - 1] = 0
    moved = (target * (target.clamp(min=1e-12).log() - policy[at])).sum(-1).mean()
    assert float(total - dpo) == pytest.approx(0.7 * float(nll + moved) + 3.0 * float(kl), rel=1e-3)
