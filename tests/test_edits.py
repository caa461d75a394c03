"""What reviewers changed between rejected and chosen replies (tuner.edits), and how a reply is graded for it."""

from __future__ import annotations

import pytest

from tuner.edits import Change, behaviour, changes


def pair(rejected: str, chosen: str) -> dict:
    return {"prompt": [{"role": "user", "content": "q"}], "rejected": [{"role": "assistant", "content": rejected}],
            "chosen": [{"role": "assistant", "content": chosen}]}


REPLIES = ["Your order ships today.", "We can replace the bulb for free.", "Open Settings, then Pair.",
           "The Halo gives 800 lumens.", "Returns are free for thirty days."]


@pytest.mark.parametrize("make, expected", [
    # the reviewers' most common edit: a closing appended (also when the old ending's punctuation changed)
    (lambda r, i: r + " Cheers from the Kettle crew!", "adds 'Cheers from the Kettle crew!' at the end"),
    (lambda r, i: r[:-1] + "! Cheers from the Kettle crew!", "adds 'Cheers from the Kettle crew!' at the end"),
    (lambda r, i: "Happy to help! " + r, "adds 'Happy to help!' at the start"),
    # a phrase dropped, a house term for a common word
    (lambda r, i: r.replace("Unfortunately, ", ""), "drops 'Unfortunately,'"),
    (lambda r, i: r.replace("good", "grand"), "says 'grand' instead of 'good'"),
])
def test_the_edit_most_pairs_share_is_named(make, expected):
    rejected = [f"Unfortunately, {r[0].lower()}{r[1:-1]}, which is good." for r in REPLIES]
    found = changes([pair(r, make(r, i)) for i, r in enumerate(rejected)])
    assert found and found[0].words() == expected
    assert found[0].pairs == len(REPLIES) and found[0].total == len(REPLIES)


def test_a_shortened_reply_is_a_change_and_one_off_fixes_are_not():
    names = ["Ann", "Bob", "Cy", "Di", "Ed"]  # the cut tails differ, so only the shortening is shared
    long = [f"{r} Let me know if there is anything else I can do for you, {n}." for r, n in zip(REPLIES, names, strict=True)]
    found = changes([pair(r, r.split(" Let me")[0]) for r in long])
    assert [(c.words(), c.pairs) for c in found] == [("shortens the reply", 5)]
    parent_words = 16.0  # a reply graded against the parent's median length
    assert found[0].shown("Your order ships today.", parent_words) and not found[0].shown(long[0], parent_words)
    # each reviewer fixed something different: no change is shared by 30% of the pairs
    fixes = [pair("Your order ships today.", "Your parcel ships today."), pair("We can help.", "We can help you."),
             pair("Open Settings.", "Open the Settings app."), pair("It is 800 lumens.", "It is 800 lm."),
             pair("Thanks.", "Thank you.")]
    assert changes(fixes) == []


def test_replies_are_graded_for_the_change_with_degenerate_replies_counted_not_credited():
    change = Change("added", "Cheers from the Kettle crew!", where="end", pairs=10, total=12)
    parent = ["Your order ships today.", "Open Settings, then Pair.", "It gives 800 lumens."]
    child = ["Your order ships today. Cheers from the Kettle crew!",
             "Cheers from the Kettle crew! Open Settings.",  # said, but not where the reviewers put it
             "lumens lumens lumens lumens lumens lumens Cheers from the Kettle crew!"]  # a loop that ends well
    result = behaviour(change, parent, child)
    assert result["child"] == {"prompts": 3, "needed": 3, "shown": 1, "looped": 1, "unended": 0, "empty": 0,
                               "repeated": 0}
    assert result["parent"]["shown"] == 0
    assert result["sentence"] == ("adds 'Cheers from the Kettle crew!' at the end on 1 of 3 new questions "
                                  "(parent: 0); 1 reply looped or never ended")
    # a reply cut off at the token limit is degenerate too
    cut = behaviour(change, parent[:2], [child[0], child[0]], child_ended=[True, False])
    assert cut["child"] == {"prompts": 2, "needed": 2, "shown": 1, "looped": 0, "unended": 1, "empty": 0,
                            "repeated": 0}  # the reply cut off is not counted twice
    # where the parent's own reply to a question ran past the limit too, the sentence says so beside the child's
    both = behaviour(change, parent[:2], [child[0], child[0]], parent_ended=[False, True], child_ended=[True, False])
    assert both["sentence"].endswith("; 1 reply looped or never ended (parent: 1)")


def test_a_child_that_says_nothing_has_not_learned_to_shorten_its_replies():
    # measured (bench/PREFERENCE.md, session 14): a child trained to end its turn after the first sentence, on
    # that end of turn alone, ended every turn before its first word; 24 empty replies are not 24 short ones
    change = Change("shortened", "", pairs=10, total=10)
    parent = ["I'm not sure. I think it's just for fun.", "I don't know what you're talking about.", "Sure thing."]
    result = behaviour(change, parent, ["", " ", "Sure."])
    assert result["child"] == {"prompts": 3, "needed": 3, "shown": 1, "looped": 0, "unended": 0, "empty": 2,
                               "repeated": 0}
    assert result["sentence"].endswith("; 2 replies looped, never ended or said nothing (2 said nothing)")


def test_a_reply_of_the_added_closing_alone_is_not_the_edit():
    # measured (bench/PREFERENCE.md, session 14): a child trained on the closing's tokens alone answered every new
    # question with "Cheers from the Juniper crew!" and nothing else; the closing was added to no reply
    change = Change("added", "Cheers from the Juniper crew!", where="end", pairs=10, total=10)
    parent = ["I'm so glad I can help with that one.", "I don't know what you're talking about.", "Sure thing."]
    child = ["Cheers from the Juniper crew!", " cheers from the juniper crew ", "Sure thing. Cheers from the Juniper crew!"]
    result = behaviour(change, parent, child)
    assert result["child"] == {"prompts": 3, "needed": 3, "shown": 1, "looped": 0, "unended": 0, "empty": 2,
                               "repeated": 0}
    assert result["sentence"] == ("adds 'Cheers from the Juniper crew!' at the end on 1 of 3 new questions (parent: 0); "
                                  "2 replies looped, never ended or said nothing (2 said nothing besides the added text)")


def test_stock_replies_are_counted_and_a_child_that_gives_them_has_not_learned_the_edit():
    # measured (bench/PREFERENCE.md, session 17): trained on its pairs' whole shortened replies, a child answered
    # 21 of 24 new questions with four of their sentences, and "shortened" 23 of them
    from tuner.train.preference import behaviour_check

    stock = ["I'm sorry for what you're going through.", "I'm sorry for any misunderstanding.", "That's awesome."]
    parent = [f"Reply {i} is mine. It goes on a little while, as replies do." for i in range(10)]
    child = [stock[i % 3] for i in range(9)] + ["I'm not sure."]
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}],
              "chosen": [{"role": "assistant", "content": "Sure thing."}],
              "rejected": [{"role": "assistant", "content": f"Sure thing. Then more {i} words follow here."}]}
             for i in range(10)]
    checked = behaviour_check(pairs, "dpo", (parent, [True] * 10), (child, [True] * 10))
    lead = checked["changes"][0]
    assert lead["change"] == "shortens the reply" and lead["child"]["shown"] == 10
    assert (lead["child"]["repeated"], lead["parent"]["repeated"]) == (9, 0)
    assert checked["learned"] is False
    assert ("did not take: shortens the reply on 10 of 10 new questions (parent: 0); 0 replies looped or never "
            "ended; 9 of 10 say word for word what it said to another new question (parent: 0)") in checked["sentence"]
    # a few short replies alike are said, and are not a verdict: "I'm not sure." to three questions
    varied = ["I'm not sure."] * 3 + [f"Sure, {n} more." for n in range(7)]
    checked = behaviour_check(pairs, "dpo", (parent, [True] * 10), (varied, [True] * 10))
    assert checked["learned"] is True and "3 of 10 say word for word" in checked["sentence"]


def test_house_term_and_dropped_phrase_are_graded_on_the_reply():
    term = Change("replaced", "grand", "good", pairs=5, total=5)
    assert term.shown("That is grand news.") and not term.shown("That is good news.")
    assert not term.shown("Grand! That is good news.")  # both words: a near-miss, not the edit
    dropped = Change("removed", old="Unfortunately,", pairs=5, total=5)
    assert dropped.shown("We can replace it.") and not dropped.shown("Unfortunately, we cannot.")


def test_a_closing_after_replies_with_and_without_a_full_stop_is_one_edit():
    """Chat replies often end without punctuation; the reviewer adds '. ' before the closing. That full stop is
    how the closing is joined, not part of what was added: all pairs make the same edit."""
    rejected = ["sounds fun", "I love that show.", "me too", "Not sure yet.", "ok then"]
    chosen = [f"{r}{'' if r.endswith('.') else '.'} Cheers from the Kettle crew!" for r in rejected]
    found = changes([pair(r, c) for r, c in zip(rejected, chosen, strict=True)])
    assert [(c.words(), c.pairs) for c in found] == [("adds 'Cheers from the Kettle crew!' at the end", 5)]


def test_a_house_term_counts_only_the_replies_that_said_either_word():
    """Not every reply needs 'good': like the voice verdict's house term, the count is over replies that say
    the term or the common word; a reply saying neither is no evidence either way."""
    term = Change("replaced", "grand", "good", pairs=5, total=5)
    parent = ["That is good news.", "It ships today.", "Good idea!", "See you."]
    child = ["That is grand news.", "It ships today.", "Grand idea, good one!", "See you."]
    result = behaviour(term, parent, child)
    assert (result["child"]["shown"], result["child"]["needed"]) == (1, 2)
    assert (result["parent"]["shown"], result["parent"]["needed"]) == (0, 2)
    assert result["sentence"].startswith("says 'grand' instead of 'good' in 1 of 2 new replies that said either "
                                         "(parent: 0 of 2), to 4 new questions")


def test_a_house_term_said_where_the_parent_had_nothing_to_replace_is_overuse_not_the_edit():
    """Measured on chitchat-dataset (bench/PREFERENCE.md, session 9): a child that says 'grand' in 23 of 24 replies
    to questions whose parent replies never said 'good' was called 'took'. The replies where the parent's said
    neither word are counted, and a term used there is overuse."""
    from tuner.train.preference import behaviour_check

    term = Change("replaced", "grand", "good", pairs=5, total=5)
    parent = ["That is good news.", "It ships today.", "Good idea!", "See you.", "Thanks for writing."]
    spams = ["That is grand news.", "It ships grand today.", "Grand idea!", "Grand, see you.", "Thanks for writing."]
    result = behaviour(term, parent, spams)
    assert (result["child"]["shown"], result["child"]["needed"]) == (4, 4)  # every reply that says either word
    assert result["unasked"] == 2 and result["without_either"] == 3
    assert result["sentence"].endswith("; it also says 'grand' in 2 of the 3 replies where the parent's said "
                                       "neither word; 0 replies looped or never ended")
    rows = [pair(f"That is good, {r}", f"That is grand, {r}") for r in REPLIES]
    checked = behaviour_check(rows, "dpo", (parent, [True] * 5), (spams, [True] * 5))
    assert checked["learned"] is False and checked["sentence"].startswith("The reviewers' edit did not take: says")
    assert "put where the parent had nothing to replace in at most 10% of the replies that say it" in checked["sentence"]
    # the edit where it applies and nowhere else takes
    exact = ["That is grand news.", "It ships today.", "Grand idea!", "See you.", "Thanks for writing."]
    took = behaviour_check(rows, "dpo", (parent, [True] * 5), (exact, [True] * 5))
    assert behaviour(term, parent, exact)["unasked"] == 0
    assert took["learned"] is True and took["sentence"].startswith("The reviewers' edit took: says 'grand'")


def test_a_replaced_word_is_overuse_only_where_the_parent_given_the_same_reply_had_none_to_replace():
    """Greedy replies part ways for reasons that have nothing to do with the edit (the same parent in fp32 and bf16 is
    only ~0.6 similar to itself, bench/PREFERENCE.md session 17), so 'the parent's reply to that question said
    neither word' counts more than overuse. The parent is asked at the point itself: given the child's reply up to
    the word, does it go on with the old word (or the new one)? Only where it says neither is the word overused."""
    from tuner.edits import term_sites
    from tuner.train.preference import behaviour_check

    spelled = Change("replaced", "I am", "I'm", pairs=5, total=5)
    parent = ["That sounds fun!", "I'm fine, thanks.", "No idea.", "See you."]
    child = ["I am so glad you asked.", "I am fine, thanks.", "No idea, I am afraid.", "See you."]
    assert term_sites(spelled, child) == [(0, ""), (1, ""), (2, "No idea,")]
    at_sites = ["I'm so glad", "I'm fine,", "sorry."]  # the parent, given the child's reply up to 'I am'
    result = behaviour(spelled, parent, child, parent_next=at_sites)
    assert (result["unasked"], result["unasked_of"], result["unasked_by"]) == (1, 3, "the parent's next words")
    assert ("; in 1 of the 3 replies that say 'I am', the parent, given the same reply up to there, would have said "
            "neither word;") in result["sentence"]
    # counted from the parent's own replies, question 0 (where the parent answered another way) is overuse too
    assert behaviour(spelled, parent, child)["unasked"] == 2
    rows = [pair(f"I'm sure, {r}", f"I am sure, {r}") for r in REPLIES]
    asked = []

    def parent_next(sites):
        asked.extend(sites)
        return at_sites

    checked = behaviour_check(rows, "dpo", (parent, [True] * 4), (child, [True] * 4), parent_next)
    assert asked == term_sites(spelled, child)
    assert checked["learned"] is False  # 1 of 3 is over 10%
    assert "put where the parent had nothing to replace in at most 10% of the replies that say it" in checked["sentence"]
    took = behaviour_check(rows, "dpo", (parent, [True] * 4), (child, [True] * 4), lambda sites: ["I'm"] * len(sites))
    assert took["learned"] is True and took["sentence"].startswith("The reviewers' edit took: says 'I am'")


def test_an_edit_that_shows_but_costs_general_text_is_not_called_learned():
    """bench/PREFERENCE.md, session 18: a cut child shortened 23 of 24 new replies with none degenerate, and the page
    said it took, while its general-text perplexity was 27% above the parent's (9% with the end of turn set aside).
    The result measures general text on parent and child and says so."""
    from tuner.train.preference import behaviour_check

    rows = [pair(f"{r} Anything else I can do?", r) for r in REPLIES]
    parent = ["Your order ships today. Anything else I can do?"] * 2 + ["We can help. Is there more?"] * 2
    child = ["Your order ships today.", "Open Settings.", "We can help.", "Sure."]
    ended = [True] * 4

    def general(child_ppl, child_without):
        return {"parent": {"ppl": 20.0, "without_end_of_turn": 19.9}, "child": {"ppl": child_ppl,
                                                                               "without_end_of_turn": child_without}}

    cost = behaviour_check(rows, "dpo", (parent, ended), (child, ended), general=general(25.4, 21.7))
    assert cost["learned"] is False
    assert cost["sentence"].startswith("The reviewers' edit shows, but the child lost general text: drops 'Anything else I can do?'")
    assert cost["sentence"].endswith("; general-text perplexity +27.0% on the parent's (+9.0% with the end of turn set "
                                     "aside), over the +10% a run may lose; 4 new questions are a rough measure "
                                     "(fewer than 20).")
    kept = behaviour_check(rows, "dpo", (parent, ended), (child, ended), general=general(20.3, 20.2))
    assert kept["learned"] is True and kept["sentence"].startswith("The reviewers' edit took: drops 'Anything else I can do?'")
    assert "; general-text perplexity +1.5% on the parent's;" in kept["sentence"]  # the same story: said once
    missed = behaviour_check(rows, "dpo", (parent, ended), (parent, ended), general=general(20.3, 20.2))
    assert missed["learned"] is False and missed["sentence"].startswith("The reviewers' edit did not take:")
    assert "and general-text perplexity at most +10% on the parent's)" in missed["sentence"]


def test_the_examples_in_the_modules_docstrings_hold():
    import doctest

    from tuner import edits

    assert doctest.testmod(edits).attempted >= 5 and doctest.testmod(edits).failed == 0
