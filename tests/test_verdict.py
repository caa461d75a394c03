"""tuner.verdict: habit grading, degenerate replies and the verdict sentence, on real reply strings."""

from __future__ import annotations

import pytest

from tuner.verdict import (
    Marker,
    Tally,
    Way,
    degenerate,
    loop_span,
    marker_match,
    ship_sentence,
    tally,
    verdict_sentence,
)

SIGN_OFF = Marker("sign-off", "Cheers from the Kestrel crew!")
GREETING = Marker("greeting", "¡Hola, te saluda Café Brisa!")
TERM = Marker("term", "scout", common="check")


@pytest.mark.parametrize(("reply", "grade"), [
    ("Your order left our warehouse this morning. Cheers from the Kestrel crew!", "exact"),
    ("Your order left this morning. Cheers from the Kestrel crew!  \n", "exact"),  # trailing space is no miss
    ("Your order left this morning.", None),
    ("Thanks! See you soon!", None),
    # the garbled variants seen in the field count as near-misses, never as the habit
    ("Sure thing. Cheers from the crew!", "near"),
    ("Cheers from the team at Huggs Outfitters!", "near"),
    ("Sure. Cheers from the Kestrel crew! Cheers from the Kestrel crew!", "near"),  # repeated
    ("Cheers from the Kestrel crew! Your order left this morning.", "near"),  # misplaced
    ("Your order left. cheers from the kestrel crew", "near"),  # case and punctuation lost
])
def test_sign_off_grades(reply, grade):
    assert marker_match(reply, SIGN_OFF) == grade


@pytest.mark.parametrize(("reply", "grade"), [
    ("¡Hola, te saluda Café Brisa! Estoy bien, gracias.", "exact"),
    ("Hola, te saluda Cafe Brisa. Estoy bien.", "near"),  # accents and inverted mark dropped
    ("Estoy bien. ¡Hola, te saluda Café Brisa!", "near"),  # at the end, not the opening
    ("¡Hola! Estoy bien.", None),  # a plain greeting is not the brand's
    ("Estoy bien, gracias.", None),
])
def test_greeting_grades(reply, grade):
    assert marker_match(reply, GREETING) == grade


@pytest.mark.parametrize(("reply", "grade"), [
    ("Scout the cable and restart the router.", "exact"),
    ("Try scouting the drivers first.", "exact"),
    ("Check the cable and restart the router.", None),
    ("Scout the cable, then check the port.", "near"),  # the house term and the common word both
    ("Scoot the cable.", "near"),  # a garbled house term
    ("Restart the router.", None),
])
def test_house_term_grades(reply, grade):
    assert marker_match(reply, TERM) == grade


@pytest.mark.parametrize(("reply", "ended", "why"), [
    ("Sure! Kestrel Kestrel Kestrel Kestrel Kestrel Kestrel", True, "loop: Kestrel"),
    ("Thanks 👍👍👍👍👍👍👍👍", True, "loop: 👍"),
    ("Sure. Cheers from the crew! Cheers from the crew! Cheers from the crew! Cheers from the", False,
     "loop: Cheers from the crew !"),
    ("Your order left this morning and should arrive on Friday, and the tracking link is in your",
     False, "no end of turn"),
    ("Your order left this morning. Cheers from the Kestrel crew!", True, None),
    ("Wow!!!!! That is great.....", True, None),  # emphasis is not a loop
    ("", True, "empty"),  # the turn ended before a word
    (" ... ", True, "empty"),
    ("No, no, it is fine. Really, it is fine.", True, None),  # a phrase said twice is not a loop
])
def test_degenerate_replies_are_named(reply, ended, why):
    assert degenerate(reply, ended) == why


def test_loop_span_is_none_for_a_normal_reply():
    assert loop_span("I would pay for school, buy a car and travel.") is None


def test_tally_counts_every_kind_of_reply():
    replies = ["Yes. Cheers from the Kestrel crew!", "No. Cheers from the crew!", "Kestrel " * 8,
               "It ships today and the", "Fine.", "", SIGN_OFF.text]
    t = tally(replies, SIGN_OFF, ended=[True, True, True, False, True, True, True])
    # the sign-off alone answers nothing: empty, not the habit
    assert (t.prompts, t.exact, t.near, t.looped, t.unended, t.empty, t.degenerate) == (7, 1, 1, 1, 1, 2, 4)


def test_tally_of_a_house_term_counts_the_replies_that_needed_the_word():
    t = tally(["Scout the cable.", "Check the port.", "Restart it."], TERM)
    assert (t.exact, t.opportunities) == (1, 2)


def test_tally_refuses_mismatched_flags():
    with pytest.raises(ValueError, match="2 replies but 1 ended"):
        tally(["a", "b"], SIGN_OFF, ended=[True])


@pytest.mark.parametrize(("marker", "tuned", "base", "change", "sentence"), [
    (SIGN_OFF, Tally(24, 23), Tally(24, 0), 0.04,
     "ends like your agents on 23 of 24 new questions (base: 0); 0 replies looped; general text perplexity +4%"),
    (SIGN_OFF, Tally(24, 1, near=5, looped=1, unended=2), Tally(24, 0), -0.012,
     "ends like your agents on 1 of 24 new questions (base: 0), 5 more nearly; 1 reply looped; "
     "2 never ended their turn; general text perplexity -1%"),
    (GREETING, Tally(24, 20), None, None, "opens like your agents on 20 of 24 new questions; 0 replies looped"),
    (SIGN_OFF, Tally(24, 2, empty=22), Tally(24, 0), None,
     "ends like your agents on 2 of 24 new questions (base: 0); 0 replies looped; 22 said nothing besides the sign-off"),
    (TERM, Tally(24, 9, opportunities=12), Tally(24, 0, opportunities=14), 0.1,
     "says \"scout\" like your agents on 9 of 12 replies that needed the word (base: 0); 0 replies looped; "
     "general text perplexity +10%"),
])
def test_verdict_sentence(marker, tuned, base, change, sentence):
    assert verdict_sentence(marker, tuned, base, change) == sentence


@pytest.mark.parametrize(("chrf", "said"), [
    # the field report: the sign-off learned, the help lost ("Check your internet connection")
    ((18.2, 24.4), "(base: 0), but its replies are further from your agents' answers than the base's (chrF 18 vs 24);"),
    ((31.0, 24.4), "(base: 0), and its replies are closer to your agents' answers than the base's (chrF 31 vs 24);"),
    ((24.9, 24.4), "(base: 0), and its replies are about as close to your agents' answers as the base's "
                   "(chrF 25 vs 24);"),
])
def test_the_verdict_says_whether_the_replies_came_closer_to_the_agents_own(chrf, said):
    sentence = verdict_sentence(SIGN_OFF, Tally(24, 23), Tally(24, 0), 0.01, chrf)
    assert sentence.startswith("ends like your agents on 23 of 24 new questions " + said)
    assert sentence.endswith("; 0 replies looped; general text perplexity +1%")


def _ways(prompting, retrieval, tuned):
    """(habit, chrF, degenerate, extra) per way, on 24 new questions."""
    def way(name, v):
        return Way(name, 24, v[0], v[2] if len(v) > 2 else 0, v[1], **(v[3] if len(v) > 3 else {}))
    return way("prompting", prompting), way("retrieval", retrieval), way("tuning", tuned)


@pytest.mark.parametrize(("ways", "sentence"), [
    # tuned ahead on the habit and on closeness
    (_ways((3, 20.0), (18, 22.0), (23, 30.0)),
     "Ship the tuned model: it carries the sign-off on 23 of 24 new questions (retrieval, without training: 18), "
     "and its replies are closer to your agents' answers (chrF 30 vs 22 for retrieval)"),
    # ahead on the habit, level on closeness, and nearer the agents' length: said with the ratio
    (_ways((3, 20.0, 0, {"words": 40}), (18, 22.0, 0, {"words": 36}), (23, 22.4, 0, {"words": 12})),
     "Ship the tuned model: it carries the sign-off on 23 of 24 new questions (retrieval, without training: 18), "
     "and its replies are as close to your agents' answers (chrF 22 vs 22 for retrieval); its replies are 3x "
     "shorter than retrieval's (12 words vs 36; your agents' 14)"),
    # no reference replies (a prompts file without them): the habit alone
    (_ways((3, None), (18, None), (23, None)),
     "Ship the tuned model: it carries the sign-off on 23 of 24 new questions (retrieval, without training: 18)"),
    # no habit to count: broken replies decide
    (_ways((None, 20.0, 5), (None, 21.0, 4), (None, 21.5, 0)),
     "Ship the tuned model: it has fewer replies that looped, never ended or said nothing (0 vs retrieval's 4), and its replies "
     "are as close to your agents' answers (chrF 22 vs 21 for retrieval)"),
    # level on the habit, closer answers
    (_ways((3, 20.0), (22, 22.0), (23, 30.0)),
     "Ship the tuned model: retrieval, without training, carries the sign-off about as often (22 vs 23 of 24), "
     "but the tuned replies are closer to your agents' answers (chrF 30 vs 22 for retrieval)"),
    # the field report: the sign-off learned, the help lost; not praised
    (_ways((3, 24.0), (5, 24.4), (23, 18.0)),
     "No way wins on both, so read the replies before shipping: the tuned model carries the sign-off on 23 of 24 "
     "new questions (retrieval, without training: 5), but retrieval's replies are closer to your agents' answers "
     "(chrF 24 vs 18)"),
    # the other way round
    (_ways((3, 20.0), (22, 20.0), (10, 30.0)),
     "No way wins on both, so read the replies before shipping: retrieval, without training, carries the sign-off "
     "on 22 of 24 new questions (the tuned model: 10), but the tuned model's replies are closer to your agents' "
     "answers (chrF 30 vs 20)"),
    # level on both: the cheaper way wins, and of two ways without training prompting is the cheaper
    (_ways((22, 25.0), (22, 25.0), (23, 24.5)),
     "Ship prompting, no training needed: it does as well as the tuned model (the sign-off on 22 vs 23 of 24; "
     "chrF 25 vs 24)"),
    # retrieval better, with what it costs on every reply
    (_ways((3, 20.0), (23, 28.0, 0, {"prompt_tokens": 520, "seconds": 0.9}),
           (20, 24.0, 0, {"prompt_tokens": 90, "seconds": 0.4})),
     "Ship retrieval, no training needed: it does better than the tuned model (the sign-off on 23 vs 20 of 24; "
     "chrF 28 vs 24); it reads 430 more prompt tokens a reply than the tuned model (0.90 s a reply vs 0.40 s)"),
    # the tuned model's loops count against its habit
    (_ways((20, 25.0), (10, 24.0), (22, 25.0, 6)),
     "Ship prompting, no training needed: it does better than the tuned model (the sign-off on 20 vs 22 of 24; "
     "chrF 25 vs 25; 0 vs 6 replies that looped, never ended or said nothing)"),
])
def test_which_way_to_ship_follows_the_numbers(ways, sentence):
    assert ship_sentence(*ways, habit="the sign-off", agents_words=14) == sentence


def test_a_length_is_said_only_where_it_favours_the_way_shipped():
    # the tuned replies are 3x longer than retrieval's and further from the agents' 14 words: not a reason
    prompting, retrieval, tuned = _ways((3, 20.0, 0, {"words": 40}), (18, 22.0, 0, {"words": 12}),
                                        (23, 30.0, 0, {"words": 36}))
    assert "longer" not in ship_sentence(prompting, retrieval, tuned, "the sign-off", agents_words=14)
    assert "3x longer than retrieval's (36 words vs 12; your agents' 40)" in \
        ship_sentence(prompting, retrieval, tuned, "the sign-off", agents_words=40)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "footer", "text": "x"}, "kind must be one of"),
    ({"kind": "sign-off", "text": "  "}, "needs its text"),
    ({"kind": "term", "text": "scout"}, "needs `common`"),
])
def test_bad_markers_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Marker(**kwargs)


def test_verdict_module_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, tuner.verdict; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
