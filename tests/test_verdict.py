"""tuner.verdict: habit grading, degenerate replies and the verdict sentence, on real reply strings."""

from __future__ import annotations

import pytest

from tuner.verdict import Marker, Tally, degenerate, loop_span, marker_match, tally, verdict_sentence

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
    ("No, no, it is fine. Really, it is fine.", True, None),  # a phrase said twice is not a loop
])
def test_degenerate_replies_are_named(reply, ended, why):
    assert degenerate(reply, ended) == why


def test_loop_span_is_none_for_a_normal_reply():
    assert loop_span("I would pay for school, buy a car and travel.") is None


def test_tally_counts_every_kind_of_reply():
    replies = ["Yes. Cheers from the Kestrel crew!", "No. Cheers from the crew!", "Kestrel " * 8,
               "It ships today and the", "Fine."]
    t = tally(replies, SIGN_OFF, ended=[True, True, True, False, True])
    assert (t.prompts, t.exact, t.near, t.looped, t.unended, t.degenerate) == (5, 1, 1, 1, 1, 2)


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
    (TERM, Tally(24, 9, opportunities=12), Tally(24, 0, opportunities=14), 0.1,
     "says \"scout\" like your agents on 9 of 12 replies that needed the word (base: 0); 0 replies looped; "
     "general text perplexity +10%"),
])
def test_verdict_sentence(marker, tuned, base, change, sentence):
    assert verdict_sentence(marker, tuned, base, change) == sentence


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
