"""bench/preference.py's pieces a reader of bench/PREFERENCE.md relies on: each edit kind turns a reply into the
reviewer's version, the product finds that edit in the pairs in the words the benchmark expects, and the named
recipes are the settings they say. Training is the benchmark's own job (bench/PREFERENCE.md), not the suite's."""

from __future__ import annotations

import doctest

import pytest

from bench import preference
from tuner.config import PreferenceConfig
from tuner.edits import changes

REPLIES = ["I'm so glad I can help with that one. It was a good day.", "I'm not sure. I think it's a good idea",
           "I'm sorry, I didn't mean that. Good luck with the move!"]


def test_the_benchmarks_examples_hold():
    assert doctest.testmod(preference).failed == 0


@pytest.mark.parametrize("kind", preference.EDITS)
def test_the_product_reads_each_edit_as_the_benchmark_expects(kind):
    pairs = [{"rejected": [{"role": "assistant", "content": r}], "chosen": [{"role": "assistant", "content": better}]}
             for r in REPLIES if (better := preference.edit(kind, r))]
    assert len(pairs) == 3  # each edit applies to each of these replies
    assert [c.words() for c in changes(pairs)][0] == preference.EXPECTED[kind]


def test_a_named_loss_is_trls_alone_and_the_default_is_the_products():
    plain = PreferenceConfig.from_dict(preference.recipe_overrides("apo_zero"))
    assert (plain.loss, plain.sft_weight, plain.edit_weight, plain.anchor_weight) == ("apo_zero", 0, 0, 0)
    assert PreferenceConfig.from_dict(preference.recipe_overrides("apo_zero+sft")).sft_weight == 1
    assert preference.recipe_overrides("default") == {}


def test_overuse_counts_the_new_word_where_the_parent_had_neither_and_prefers_the_products_count():
    replies = [{"parent": "I don't know.", "child": "I am glad you asked."},  # overused
               {"parent": "Sure thing.", "child": "Sure thing."},  # neither, and not overused
               {"parent": "I'm fine.", "child": "I am fine."}]  # the edit where it belongs
    assert preference.overuse("spelled", {}, replies) == {"unasked": 1, "unasked_of": 2,
                                                          "unasked_by": "the parent's reply"}
    # a record the product counted: its numbers (it counts "grandma" as "grand"), the old way before session 18 ...
    assert preference.overuse("term", {"unasked": 4, "without_either": 24}, replies) == {
        "unasked": 4, "unasked_of": 24, "unasked_by": "the parent's reply"}
    # ... and since: of the child's replies that say the word, asked of the parent at that point
    counted = {"unasked": 1, "unasked_of": 15, "without_either": 6, "unasked_by": "the parent's next words"}
    assert preference.overuse("spelled", counted, replies) == {"unasked": 1, "unasked_of": 15,
                                                               "unasked_by": "the parent's next words"}
    assert preference.overuse("closing", {}, replies) == {"unasked": None, "unasked_of": None, "unasked_by": None}
    row = {"edit": "spelled", "status": "completed", "change_found": preference.EXPECTED["spelled"], "needed": 20,
           "shown": 20, "degenerate": 0, "prompts": 24, "ppl_change_vs_parent": 0.01, "parent_words_change": 0.02,
           "voice_kept": 0.4, "repeated": [0, 2]}
    assert preference.missed({**row, "unasked": 1, "unasked_of": 6}) == ["overuse"]  # 1 of 6 is over 10%
    assert preference.missed({**row, "unasked": 1, "without_either": 6}) == ["overuse"]  # a record before session 18
    # PASS: the words' similarity to the parent's greedy reply is no target (the same parent decoded in fp32 is ~0.6)
    assert preference.missed({**row, "unasked": 1, "unasked_of": 20}) == []
    # the parent's own words 15% less likely under the child: its voice was not kept
    assert preference.missed({**row, "parent_words_change": 0.15}) == ["voice"]
    # half the new questions answered with what another got, where the parent did not: the product says so too
    assert preference.missed({**row, "repeated": [0, 12]}) == ["stock replies"]
    assert preference.missed({**row, "repeated": [12, 12]}) == []
