"""Feedback in the playground, through the page's API (gradio_client) against the real app.py and a real run:
thumbs and better replies on chat replies, a blind A/B pair and its vote; each lands in the run's
feedback.jsonl with the prompt as sent, the replies, their sources and the reviewer."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from app_server import api_client, refused, running_app

from tuner import feedback
from tuner.runs import Run

SETTINGS = (24, 0.0, 0.9, 0, 1.1)  # max new tokens, temperature, top-p, seed, repetition penalty
QUESTION = "Hi, my lamp flickers since Monday."


@pytest.fixture(scope="module")
def server(tmp_path_factory, signoff_run):
    home = Path(os.environ["TUNER_HOME"])
    with running_app(home, tmp_path_factory.mktemp("feedback_app") / "app.log") as srv:
        yield srv


@pytest.fixture
def client(server):
    return api_client(server)



def _raw(bubbles: list[dict]) -> list[dict]:
    """A chat column as gradio_client returns it (escaped text parts) -> plain {role, content} messages."""
    out = []
    for b in bubbles:
        content = b["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        out.append({"role": b["role"], "content": html.unescape(text)})
    return out


def _new_records(run: Path, before: int) -> list[dict]:
    return feedback.records(run)[before:]


def test_thumbs_and_a_better_reply_are_stored_with_the_prompt_as_sent(client, signoff_run):
    run_id = signoff_run.name
    before = len(feedback.records(signoff_run))
    _msg, base, tuned, prompted = client.predict(QUESTION, run_id, True, *SETTINGS, api_name="/chat")
    tuned, prompted = _raw(tuned), _raw(prompted)
    assert [m["role"] for m in tuned] == ["user", "assistant"] and tuned[1]["content"].strip()

    note = client.predict(run_id, "tuned", tuned, 1, False, "Ana", api_name="/rate_reply")
    n = before + 1
    assert note == f"Saved: thumbs down on the tuned reply. {n} judgement{'s' if n > 1 else ''} on this run so far."
    note = client.predict(run_id, "prompted", prompted, 1, True, "", api_name="/rate_reply")
    assert note.startswith("Saved: thumbs up on the prompt-only reply.")
    better = "Unplug it for ten seconds, then plug it back in. Stay sunny, the Lumen Lamps team."
    note, continued = client.predict(run_id, "tuned", tuned, 1, better, "Ana", api_name="/edit_reply")
    assert note.startswith("Saved: your better reply in place of the tuned one.")
    assert continued == [tuned[0], {"role": "assistant", "content": better}]  # the chat goes on from the edit

    thumb_down, thumb_up, edit = _new_records(signoff_run, before)
    question = {"role": "user", "content": QUESTION}
    # the tuned column was sent the run's own training prompt (this run has no system prompt): the question
    assert thumb_down["prompt"] == [question]
    assert thumb_down["replies"] == [{"source": run_id, "text": tuned[1]["content"]}]
    assert thumb_down["judgement"] == {"thumb": "down"} and thumb_down["reviewer"] == "Ana"
    # the prompt-only column was sent the brand brief as its system prompt: the record says so
    assert thumb_up["prompt"][0]["role"] == "system" and "Stay sunny" in thumb_up["prompt"][0]["content"]
    assert thumb_up["prompt"][1:] == [question] and thumb_up["reviewer"] is None
    assert thumb_up["replies"] == [{"source": "prompt-only", "text": prompted[1]["content"]}]
    assert edit["judgement"] == {"edited": better} and edit["replies"][0]["text"] == tuned[1]["content"]
    # the edit is a preference pair: chosen = the reviewer's reply, rejected = the model's
    assert feedback.pairs(signoff_run)[-1] == {"prompt": [question],
                                               "chosen": [{"role": "assistant", "content": better}],
                                               "rejected": [{"role": "assistant", "content": tuned[1]["content"]}]}


def test_blind_pair_hides_which_is_which_until_the_vote_then_shows_win_rates(client, signoff_run):
    run_id = signoff_run.name
    before = len(feedback.records(signoff_run))
    a, b, note, vote, pair = client.predict(run_id, "base", "Where is my order? It has been a week.", *SETTINGS,
                                            "Ben", api_name="/ab_pair")
    assert a.strip() and b.strip() and vote["value"] is None and vote["interactive"]  # the vote opens
    assert "Which reply is better?" in note and re.fullmatch(r"[0-9a-f]{6}", pair)  # the pair's id, shown with it
    shown = json.dumps([a, b, note])
    assert run_id not in shown and "base model" not in shown  # nothing on the page says which is which yet
    assert len(feedback.records(signoff_run)) == before  # and nothing is recorded before the vote

    # a vote names the pair it is for: one for another pair is refused and stored nowhere
    assert f"pair {pair} is the one on screen" in refused(client, "A", "", "0badid", api_name="/ab_vote")
    assert len(feedback.records(signoff_run)) == before
    reveal, rates, _vote, saved = client.predict("A", "", pair, api_name="/ab_vote")
    (record,) = _new_records(signoff_run, before)
    sources = [r["source"] for r in record["replies"]]
    assert sorted(sources) == sorted([run_id, "base"])
    assert [r["text"] for r in record["replies"]] == [a, b]  # what was shown, in the order shown
    assert record["judgement"] == {"choice": "A", "a": sources[0], "b": sources[1], "pair": pair}
    assert record["reviewer"] == "Ben"  # the reviewer named when the pair was asked for
    assert record["prompt"] == [{"role": "user", "content": "Where is my order? It has been a week."}]
    label = {run_id: f"{run_id} (this run)", "base": "the base model"}
    # only now the page says which was which, and who won
    assert f"A was **{label[sources[0]]}**, B was **{label[sources[1]]}**" in reveal.replace("\\", "")
    assert f"Winner: **{label[sources[0]]}**." in reveal.replace("\\", "")
    assert saved.startswith("Saved: your blind vote (A is better).")
    # the running win rate per source, with its 95% interval, as feedback.report counts it
    table = {row[0]: row for row in rates["data"]}
    for source, r in feedback.report(signoff_run)["win_rates"].items():
        _, wins, votes, rate, interval = table[label[source]]
        assert (wins, votes) == (r["wins"], r["votes"]) and rate == f"{r['rate']:.0%}"
        assert interval == f"{r['low']:.0%} to {r['high']:.0%}"

    # one vote per pair; the next pair, "both bad", counts as a loss for both
    assert "already has a vote" in refused(client, "B", "", pair, api_name="/ab_vote")
    *_, second = client.predict(run_id, "base", "Can I return a bulb?", *SETTINGS, "", api_name="/ab_pair")
    # the first pair's id no longer counts once the second is on screen
    assert f"the vote was for pair {pair}" in refused(client, "both bad", "Cy", pair, api_name="/ab_vote")
    reveal, rates, *_ = client.predict("both bad", "Cy", second, api_name="/ab_vote")
    assert "Both were judged bad" in reveal
    last = feedback.records(signoff_run)[-1]
    assert last["judgement"]["choice"] == "both bad" and last["reviewer"] == "Cy"
    assert len(_new_records(signoff_run, before)) == 2


def _silenced_copy(run: Path, name: str) -> Path:
    """A copy of `run` whose adapter does nothing (LoRA B zeroed): it answers like the base model."""
    from safetensors.torch import load_file, save_file

    copy = run.parent / name
    if not copy.exists():
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("feedback.jsonl", "checkpoints"))
        weights = copy / "adapter" / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    return copy


def test_a_preference_run_is_compared_with_its_parent_by_default(client, server, signoff_run):
    """A child run (here: a copy of the run whose status names it as parent, its adapter silenced so that
    it answers unlike its parent) offers its parent first, and the parent answers beside it."""
    from gradio_client import Client

    child = _silenced_copy(signoff_run, "signoff-ui-child")  # its own name: the browser test has a copy too
    Run(child).update_status(parent=signoff_run.name, method="dpo")
    compare_with, *_, left = client.predict(child.name, api_name="/ab_reset")  # what picking the run shows
    assert compare_with["value"] == left["value"] == signoff_run.name  # A/B and the chat's left column
    assert [f"Its parent run: {signoff_run.name}", signoff_run.name] in compare_with["choices"]

    # parent and child side by side in the chat; a thumb on the parent's reply names the parent as its source
    _msg, parent_chat, child_chat, _ = client.predict(QUESTION, child.name, False, *SETTINGS, signoff_run.name,
                                                      api_name="/chat")
    alone = Client(server.url, verbose=False, download_files=False)  # another browser: a chat of its own
    _msg, base_chat, parent_alone, _ = alone.predict(QUESTION, signoff_run.name, False, *SETTINGS, api_name="/chat")
    # the left column is the parent's own model (as when the parent is picked), the right the child's
    assert _raw(parent_chat) == _raw(parent_alone) and _raw(child_chat) == _raw(base_chat)
    assert _raw(parent_chat) != _raw(child_chat)
    note = client.predict(child.name, signoff_run.name, _raw(parent_chat), 1, True, "", api_name="/rate_reply")
    assert note.startswith(f"Saved: thumbs up on the {signoff_run.name} reply.")
    (thumb,) = feedback.records(child)
    assert thumb["replies"][0]["source"] == signoff_run.name and thumb["prompt"][-1]["content"] == QUESTION
    a, b, note, _, pair = client.predict(child.name, signoff_run.name, "Is the Nova waterproof?", *SETTINGS, "",
                                         api_name="/ab_pair")
    assert a != b and "same word for word" not in note
    fresh = Client(server.url, verbose=False, download_files=False)
    parent_said = _raw(fresh.predict("Is the Nova waterproof?", signoff_run.name, False, *SETTINGS,
                                     api_name="/chat")[2])[-1]["content"]
    assert parent_said in (a, b)
    parent_is = "A" if a == parent_said else "B"
    reveal, *_ = client.predict(parent_is, "", pair, api_name="/ab_vote")
    assert f"Winner: **{signoff_run.name} (its parent)**" in reveal.replace("\\", "")
    _, record = feedback.records(child)
    assert sorted(r["source"] for r in record["replies"]) == sorted([child.name, signoff_run.name])
    # identical replies make no preference pair, and the page says so before the vote
    twin = _silenced_copy(signoff_run, "signoff-ui-twin")
    a, b, note, *_ = client.predict(child.name, twin.name, "Is the Nova waterproof?", *SETTINGS, "",
                                    api_name="/ab_pair")
    assert a == b and "same word for word" in note


def _other_base(run: Path) -> str:
    """A copy of `run` that says it was trained on another base model (it cannot answer beside `run`)."""
    copy = run.parent / "signoff-other-base"
    if not copy.exists():
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("feedback.jsonl", "checkpoints"))
        config = copy / "config.yaml"
        config.write_text("\n".join("base_model: SomeOrg/another-model" if line.startswith("base_model:") else line
                                     for line in config.read_text().splitlines()) + "\n")
    return copy.name


def test_bad_feedback_gets_a_plain_message_and_writes_nothing(client, signoff_run):
    run_id = signoff_run.name
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Try again later."}]
    before = feedback.records(signoff_run)
    cases = [
        (("A", "", ""), "/ab_vote", "There is no pair to vote on yet"),
        ((run_id, "tuned", history, 1, "   ", ""), "/edit_reply", "The better reply is empty"),
        ((run_id, "tuned", history, 1, "Try again later.", ""), "/edit_reply", "same as the model's reply"),
        ((run_id, "tuned", history, 0, True, ""), "/rate_reply", "is the customer's, not a reply"),
        ((run_id, "tuned", history, 5, True, ""), "/rate_reply", "There is no message 5"),
        ((run_id, "sideways", history, 1, True, ""), "/rate_reply", "Unknown column 'sideways'"),
        (("Hi", run_id, False, *SETTINGS, run_id), "/chat", "not with itself"),
        (("", "tuned", history, 1, True, ""), "/rate_reply", "Pick a tuned run first"),
        (("../decoy", "tuned", history, 1, True, ""), "/rate_reply", "not a valid run id"),
        ((run_id, "base", "  ", *SETTINGS, ""), "/ab_pair", "Type a prompt first"),
        ((run_id, run_id, "Hello?", *SETTINGS, ""), "/ab_pair", "not with itself"),
        ((run_id, _other_base(signoff_run), "Hello?", *SETTINGS, ""), "/ab_pair", "only a completed LoRA run on "
                                                                                "the same base model"),
        ((run_id, "tuned", [{"role": "user"}, {"role": "assistant", "content": "Hi"}], 1, "Better.", ""),
         "/edit_reply", "is not a {role, content} message"),
    ]
    for args, endpoint, message in cases:
        said = refused(client, *args, api_name=endpoint)
        assert message.lower() in said.lower(), (endpoint, said)
        assert "Traceback" not in said
    assert feedback.records(signoff_run) == before


def test_a_judgement_of_a_reply_the_chat_no_longer_holds_is_refused():
    """A thumb or edit names the reply it was clicked on (its index and text, from the page); when the chat moved
    on between the click and its handling (cleared, a new turn, another run), nothing is stored."""
    from tuner.errors import TunerError
    from tuner.ui.playground_tab import still_shown

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello & welcome!"}]
    still_shown(chat, 1, "Hello &amp; welcome!")  # the bubble shows the escaped text: the same reply
    still_shown(chat, [1, None], [{"type": "text", "text": "Hello  &amp; welcome!"}])
    for index, seen in ((1, "Hello!"), (3, "Hello & welcome!"), (1, "")):
        with pytest.raises(TunerError, match="the chat changed after you clicked"):
            still_shown(chat, index, seen)
