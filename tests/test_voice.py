"""The brand's voice mined from its replies: recurring openings and sign-offs, the brief for the base model."""

from __future__ import annotations

import json

import pytest

from tuner.voice import brand_phrases, make_brand_brief, phrase_rate, training_replies


@pytest.mark.parametrize("replies, expected", [
    # a sign-off shared by every reply wins whole, not just its last words
    ([f"Answer {i} here. Best wishes, the Acme crew." for i in range(6)],
     [("Best wishes, the Acme crew.", "sign-off")]),
    # an opening shared by most replies, endings all different
    ([f"Hello friend! Your {thing} ships {day}." for thing, day in
      [("lamp", "today"), ("bulb", "on Monday"), ("cable", "soon"), ("shade", "next week"), ("dimmer", "now")]],
     [("Hello friend!", "opening")]),
    # both, with case and spacing differences ignored
    (["Hi there!  We can help.  Cheers, Kettle & Co.", "hi there! No stock. Cheers, Kettle & Co.",
      "Hi there! Try again. cheers, kettle & co."], [("Hi there!", "opening"), ("Cheers, Kettle & Co.", "sign-off")]),
    # nothing recurs: nothing is mined
    (["Sure.", "No problem at all.", "We ship on Monday."], []),
    ([], []),
])
def test_brand_phrases_are_recurring_openings_and_sign_offs(replies, expected):
    found = {(p["phrase"].lower(), p["position"]) for p in brand_phrases(replies)}
    assert found == {(phrase.lower(), position) for phrase, position in expected}


def test_phrase_rate_counts_replies_with_any_phrase():
    phrases = [{"phrase": "Cheers, Ann", "position": "sign-off", "share": 1.0}]
    assert phrase_rate(["ok. cheers,  ann", "no", "Cheers, Ann!", "x"], phrases) == 0.5
    assert phrase_rate(["a"], []) is None


def test_training_replies_and_the_brief_come_from_the_runs_own_data(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "You are Kettle & Co."},
                          {"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Ahoy! Answer {i}. Fair winds, Kettle & Co."}]}
            for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    replies, system = training_replies(train)
    assert len(replies) == 6 and system == "You are Kettle & Co."
    brief = make_brand_brief(replies, system)
    assert brief.startswith("You are Kettle & Co.") and '"Fair winds, Kettle & Co."' in brief
    assert training_replies(tmp_path / "missing.jsonl") == ([], None)
