"""The Runs tab's "Teach it with feedback", driven through the real app's API (gradio_client), on the real model:
an SFT run, reviewers' feedback given through the page, the report, pairs out and in, a DPO child started from
the page and watched, cancelled and resumed on the Train tab, and a finished DPO child (the session's, trained
once through the command line on the same kind of feedback) showing what the feedback changed."""

from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from app_server import api_client, refused, running_app
from preference_pairs import N_PAIRS, PHRASE, has_phrase, reviewers_pairs

from tuner import feedback
from tuner.config import PreferenceConfig
from tuner.runs import Run, update_status
from tuner.ui.runs_tab import PREF_SETTINGS

AB_SETTINGS = (24, 0.0, 0.9, 0, 1.1)  # the Playground's sampling: max new tokens, temperature, top-p, seed, penalty


def _value(output):
    """A component's value as gradio_client returns it (an update dict carries it under "value")."""
    return output.get("value") if isinstance(output, dict) and output.get("__type__") == "update" else output


def _sft_copy(signoff_run: Path, name: str) -> str:
    """A finished SFT run of its own (a copy of the session's signoff run, without its feedback), so other
    test modules' judgements on the shared run do not change the counts here."""
    target = signoff_run.parent / name
    shutil.copytree(signoff_run, target, ignore=shutil.ignore_patterns("checkpoints", "feedback.jsonl", "eval.*"))
    update_status(target, adapter=str(Run(target).adapter_dir))
    return name


def _pairs_file(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _pair(i: int, seed: int = 3) -> dict:
    prompt, reply, better = reviewers_pairs(i + 1, seed)[i]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": better}],
            "rejected": [{"role": "assistant", "content": reply}]}


def _settings(**overrides) -> list:
    """The Runs tab's preference settings in PREF_SETTINGS order (the API's order after the run id)."""
    values = {**PreferenceConfig().to_dict(), **overrides}
    return [values[n] for n in PREF_SETTINGS]


def _import(client, run_id: str, path: Path) -> tuple:
    from gradio_client import handle_file

    return client.predict(run_id, handle_file(str(path)), api_name="/import_feedback")


def _status(client, run_id: str) -> tuple[str, str]:
    progress, *_ = client.predict(run_id, api_name="/status")
    match = re.search(r'data-status="(\w+)"', progress)
    return (match.group(1) if match else "?"), progress


def _wait(client, run_id: str, wanted: tuple[str, ...], timeout: float, until=None) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state, progress = _status(client, run_id)
        if (state in wanted and (until is None or until(progress))) or time.monotonic() > deadline:
            return state, progress
        if state == "failed":
            return state, progress
        time.sleep(1.0)


def _table(client) -> list[dict]:
    frame = client.predict(api_name="/runs")[0]
    return [dict(zip(frame["headers"], row, strict=True)) for row in frame["data"]]


@pytest.fixture(scope="module")
def home() -> Path:
    import os

    return Path(os.environ["TUNER_HOME"])


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    with running_app(home, tmp_path_factory.mktemp("app") / "app.log") as srv:
        yield srv


def test_too_few_pairs_keep_the_button_off_and_say_how_many_more(server, signoff_run, tmp_path):
    client = api_client(server)
    run_id = _sft_copy(signoff_run, "fb-few")
    words, counts, wins, lost, need = client.predict(run_id, api_name="/feedback_report")
    assert "No feedback" in words and "Playground" in words
    _import(client, run_id, _pairs_file(tmp_path / "prefs.jsonl", [_pair(i) for i in range(7)]))
    words, counts, wins, lost, need = client.predict(run_id, api_name="/feedback_report")
    assert "7 preference pairs" in words
    assert ["preference pairs (for DPO)", 7] in counts["data"]
    assert "7 preference pairs so far; preference tuning needs at least 10: 3 more" in need
    # the button is off in the page ...
    from tuner.ui.runs_tab import feedback_report

    assert feedback_report(run_id)["fb_train_btn"]["interactive"] is False
    # ... and the server refuses too, leaving no run folder behind
    runs_before = {r["run"] for r in _table(client)}
    message = refused(client, run_id, *_settings(), api_name="/train_on_feedback")
    assert "3 more" in message and "Traceback" not in message
    assert {r["run"] for r in _table(client)} == runs_before


def test_an_import_names_each_bad_line_and_keeps_the_good_ones(server, signoff_run, tmp_path):
    client = api_client(server)
    run_id = _sft_copy(signoff_run, "fb-import")
    rows = [_pair(0), _pair(1),
            {"prompt": [{"role": "user", "content": "Where?"}], "chosen": "Here."},
            "{not json",
            {"prompt": [{"role": "user", "content": "Where?"}], "chosen": "Here.", "rejected": "Here."},
            *[_pair(i) for i in range(2, 12)]]
    *views, said = _import(client, run_id, _pairs_file(tmp_path / "team-ratings.jsonl", rows))
    print(said)
    assert "Imported **12 pairs** from team-ratings.jsonl" in said
    assert "3 lines left out" in said
    assert re.search(r"line 3: missing field rejected\. Fix:", said)
    assert re.search(r"line 4: not valid JSON .*Fix:", said)
    assert re.search(r"line 5: chosen and rejected are the same reply.*Fix:", said)
    assert "/tmp" not in said  # the file is named as the user knows it, not by the server's upload path
    words, counts, *_ = views
    assert "12 preference pairs" in words and ["imported pairs", 12] in counts["data"]
    from tuner.ui.runs_tab import feedback_report

    assert feedback_report(run_id)["fb_train_btn"]["interactive"] is True
    # an opening added was not measured: no settings of its own are announced
    assert "settings measured" not in feedback_report(run_id)["fb_need"]
    # the pairs go out again in trl's preference format, the same 12
    out = client.predict(run_id, api_name="/export_feedback")
    lines = [json.loads(line) for line in Path(out["path"]).read_text().splitlines()]
    assert len(lines) == 12 and lines[0] == _pair(0)


def test_before_a_run_the_page_says_which_settings_the_pairs_edit_will_take(server, signoff_run, tmp_path):
    # pairs that cut the reply train with a cut's settings (tuner.config.EDIT_SETTINGS) unless a box is changed:
    # the page says so beside the button, before anyone presses it, not only in the run's result
    from tuner.ui.runs_tab import feedback_report

    client = api_client(server)
    run_id = _sft_copy(signoff_run, "fb-cut")
    rest = ["Our lamps are hand made.", "Shipping is free over fifty dollars.", "You can track it online.",
            "The warehouse opens at nine.", "Returns take a week.", "We also sell bulbs.", "Call us any time.",
            "Gift wrap costs two dollars.", "Every lamp has a warranty.", "Sunny days ahead!", "Thanks for waiting.",
            "Our shop is in Leeds."]
    cuts = [{"prompt": _pair(i)["prompt"], "chosen": [{"role": "assistant", "content": f"Yes, order {i} ships today."}],
             "rejected": [{"role": "assistant", "content": f"Yes, order {i} ships today. {more}"}]}
            for i, more in enumerate(rest)]
    _import(client, run_id, _pairs_file(tmp_path / "cuts.jsonl", cuts))
    *_, need = client.predict(run_id, api_name="/feedback_report")
    assert "12 preference pairs: ready to train with DPO" in need
    assert ("Pairs that shorten the reply train with the settings measured for a cut: learning rate 0.0004, anchor "
            "weight 3, 1 pass. A setting you change above keeps your value.") in need.replace("\\", "")
    assert feedback_report(run_id)["fb_train_btn"]["interactive"] is True


def test_the_report_gives_win_rates_with_their_interval_and_the_prompts_where_the_tuned_bot_lost(server,
                                                                                              signoff_run):
    from tuner import feedback

    client = api_client(server)
    run_id = _sft_copy(signoff_run, "fb-report")
    votes = ["tuned", "tuned", "base", "tuned", "both bad", "tuned"]  # who the reviewer picked, prompt by prompt
    for i, pick in enumerate(votes):
        prompt = [{"role": "user", "content": f"Question {i}: is the Nova waterproof?"}]
        a, b = {"source": "tuned", "text": f"Tuned answer {i}."}, {"source": "base", "text": f"Base answer {i}."}
        choice = {"tuned": "A", "base": "B"}.get(pick, pick)
        feedback.record_vote(signoff_run.parent / run_id, prompt, a, b, choice, reviewer="Ana")
    feedback.record_thumb(signoff_run.parent / run_id, [{"role": "user", "content": "Hi"}], "Hello!", up=True)
    words, counts, wins, lost, need = client.predict(run_id, api_name="/feedback_report")
    print(words)
    # tuned won 4 of 6 (Wilson 95%: 30% to 90%), base 1 of 6 (3% to 56%); "both bad" is a loss for both
    assert "**7 judgements** on **fb-report**: 6 blind votes (1 both bad), 1 thumb (1 up). They make **5 preference " \
           "pairs**." in words.replace("\\", "")
    assert ("In blind votes: **fb-report (this run)** won 4 of 6 (67%; 95% interval 30% to 90%); **the base model** "
            "won 1 of 6 (17%; 95% interval 3% to 56%).") in words.replace("\\", "")
    rows = {r[0]: r for r in wins["data"]}
    assert rows["fb-report (this run)"][1:] == [4, 6, "67%", "30% to 90%"]
    assert rows["the base model"][1:] == [1, 6, "17%", "3% to 56%"]
    assert ["blind A/B votes", 6] in counts["data"] and ['... of which "both bad"', 1] in counts["data"]
    assert ["thumbs up", 1] in counts["data"] and ["preference pairs (for DPO)", 5] in counts["data"]
    assert "The tuned bot lost 2 votes" in words
    assert [(r[0], r[1], r[2], r[3]) for r in lost["data"]] == [
        ("Question 2: is the Nova waterproof?", "B", "the base model", "Ana"),
        ("Question 4: is the Nova waterproof?", "both bad", "neither", "Ana")]
    assert "5 preference pairs so far" in need and "5 more" in need


@pytest.mark.slow
def test_feedback_through_the_page_starts_a_dpo_child_that_cancels_and_resumes_like_any_run(server, home,
                                                                                          signoff_run):
    client = api_client(server)
    parent = _sft_copy(signoff_run, "fb-sft")
    # reviewers' judgements through the Playground tab's API: "write the better reply" on 40 replies (the better
    # one opens with PHRASE), then three blind A/B votes of this run against the base model
    for prompt, reply, better in reviewers_pairs(N_PAIRS):
        history = [*prompt, {"role": "assistant", "content": reply}]
        note, _ = client.predict(parent, "tuned", history, 1, better, "QA", api_name="/edit_reply")
        assert note.startswith("Saved: your better reply")
    for question, choice in (("Is the Nova waterproof?", "A"), ("Do you ship to Spain?", "B"),
                             ("My dimmer hums, why?", "both bad")):
        *_, pair = client.predict(parent, "base", question, *AB_SETTINGS, "Ana", api_name="/ab_pair")
        reveal, *_ = client.predict(choice, "", pair, api_name="/ab_vote")
        assert "this run" in reveal  # the page says which was which only now
    # the votes this run lost, as stored with it (A and B were shuffled, so the winner is known only from the vote)
    votes = [r["judgement"] for r in feedback.records(signoff_run.parent / parent) if r["kind"] == "vote"]
    lost = sum({"A": j["a"], "B": j["b"]}.get(j["choice"]) != parent for j in votes)
    # the Runs tab's report counts them: pairs from the edits and the decided votes, win rates, lost prompts
    words, counts, wins, lost_prompts, need = client.predict(parent, api_name="/feedback_report")
    print(words)
    assert f"**43 judgements** on **{parent}**: 3 blind votes (1 both bad), 40 edited replies." in words.replace("\\", "")
    n_pairs = dict(counts["data"])["preference pairs (for DPO)"]
    assert n_pairs in (N_PAIRS, N_PAIRS + 1, N_PAIRS + 2)  # a vote between two identical replies makes no pair
    assert f"{n_pairs} preference pairs: ready to train with DPO" in need
    assert {r[0]: r[2] for r in wins["data"]} == {f"{parent} (this run)": 3, "the base model": 3}
    assert len(votes) == 3 and len(lost_prompts["data"]) == lost and lost >= 1  # "both bad" is a loss

    runs_before = {r["run"] for r in _table(client)}
    child = _value(client.predict(parent, *_settings(max_length=128), api_name="/train_on_feedback"))
    assert child and child not in runs_before and (home / "runs" / child).is_dir()
    stepping = re.compile(r"step ([1-9]\d*) (?:of|/) (\d+)")

    # the Train tab shows it like an SFT run: its method, then step n of N, N being what the page planned
    state, progress = _wait(client, child, ("running",), 600, until=stepping.search)
    assert state == "running", progress
    assert 'data-method="dpo"' in progress and f"preference tuning of {parent}" in progress
    from tuner.ui.train_tab import preference_steps

    planned = preference_steps(PreferenceConfig(max_length=128), n_pairs)
    assert int(stepping.search(progress).group(2)) == planned == Run(home / "runs" / child).status()["max_steps"]
    status = Run(home / "runs" / child).status()
    assert status["method"] == "dpo" and status["parent"] == parent
    assert status["preference_rows"] == n_pairs and status["held_out_pairs"] == 8 and status["train_rows"] == n_pairs - 8
    # cancel and resume from the page, as for SFT: the resumed job trains on (then it is cancelled for good)
    client.predict(child, api_name="/cancel")
    state, _ = _wait(client, child, ("cancelled",), 60)
    assert state == "cancelled"
    stopped_at = Run(home / "runs" / child).status()["step"]
    client.predict(child, api_name="/resume")
    state, progress = _wait(client, child, ("running",), 600,
                            until=lambda p: (m := stepping.search(p)) and int(m.group(1)) > stopped_at)
    log = (home / "runs" / child / "train.log").read_text()[-3000:]
    assert state == "running" and 'data-method="dpo"' in progress, (progress, log)
    client.predict(child, api_name="/cancel")
    assert _wait(client, child, ("cancelled",), 60)[0] == "cancelled"


def test_a_finished_preference_run_says_what_the_feedback_changed_on_the_page(server, home, dpo_child):
    """What the page shows for the DPO child the command line trained (tests/conftest.py's `dpo_child`, on 40
    reviewers' judgements that open the better reply with PHRASE): the behaviour first, then the pairs."""
    client = api_client(server)
    out, _printed = dpo_child
    child, status = out.name, Run(out).status()
    parent = status["parent"]
    state, progress = _status(client, child)
    assert state == "completed", progress
    pm = status["preference_metrics"]
    before, after = pm["before"], pm["after"]
    print(f"\nheld-out pairs {pm['held_out_pairs']}: preference accuracy {before['accuracy']} -> {after['accuracy']}, "
          f"reward margin {before['margin']} -> {after['margin']}; {status['step']} steps, {status['wall_s']} s")
    # the property every chosen reply shares is more frequent in the child's replies than in its parent's
    replies = status["replies"]
    n_parent, n_child = sum(has_phrase(r["parent"]) for r in replies), sum(has_phrase(r["child"]) for r in replies)
    print(f"'{PHRASE}' in greedy replies to {len(replies)} held-out prompts: parent {n_parent}, child {n_child}")
    assert n_child > n_parent

    # the page says it in sentences with numbers, what the reviewers changed first: on the Train tab ...
    said = f"{before['accuracy']:.0%} of the time before ({parent}) and {after['accuracy']:.0%} after (DPO)"
    assert 'data-method="dpo"' in progress and f"preference tuning of {parent}" in progress
    assert said in progress and "Voice check on new questions: the parent" in progress
    behaviour = status["behaviour"]["sentence"]
    assert behaviour.startswith("The reviewers' edit") and progress.index(html.escape(behaviour)) < progress.index(said)
    assert f"on {n_child} of {len(replies)} new questions" in behaviour or "did not take" in behaviour
    assert "8 held-out pairs prove little" in progress
    # ... and in the run's details, with its lineage; the parent names its child
    details = client.predict(child, api_name="/run_details")
    assert said in details.replace("\\", "") and "| kind | DPO run |" in details
    assert f"data `signoff-run-data` → SFT run `{parent}` → DPO run `{child}`" in details, details
    assert f"DPO run `{child}`" in client.predict(parent, api_name="/run_details")
    # the runs table: data → SFT run → preference run
    rows = {r["run"]: r for r in _table(client)}
    assert rows[child]["came from"] == f"signoff-run-data → {parent} (SFT) → DPO"
    assert rows[parent]["came from"] == "signoff-run-data → SFT"


def test_run_ids_that_are_not_runs_are_refused_by_the_feedback_endpoints(server, home, tmp_path):
    decoy = home / "decoy-feedback"
    (decoy / "adapter").mkdir(parents=True, exist_ok=True)
    (decoy / "status.json").write_text(json.dumps({"status": "completed"}))
    prefs = _pairs_file(tmp_path / "p.jsonl", [_pair(i) for i in range(12)])
    from gradio_client import handle_file

    client = api_client(server)
    for probe in ("../decoy-feedback", str(decoy), "..%2Fdecoy-feedback", "signoff-run/../../decoy-feedback", ".."):
        for args, endpoint in (((probe,), "/feedback_report"), ((probe,), "/export_feedback"),
                               ((probe, handle_file(str(prefs))), "/import_feedback"),
                               ((probe, *_settings()), "/train_on_feedback")):
            message = refused(client, *args, api_name=endpoint)
            assert "not a valid run id" in message or "no run named" in message.lower(), (endpoint, probe, message)
    assert not (decoy / "feedback.jsonl").exists() and sorted(p.name for p in decoy.iterdir()) == ["adapter",
                                                                                                  "status.json"]


@pytest.mark.parametrize("pairs, thumbs, method, words", [
    (0, 0, None, "needs at least 10: 10 more"),
    (9, 0, None, "9 preference pairs so far; preference tuning needs at least 10: 1 more"),
    (10, 0, "dpo", "10 preference pairs: ready to train with DPO"),
    (12, 30, "dpo", "The 30 thumbs are not used by DPO"),
    (0, 12, "kto", "12 thumbs up/down: ready to train with KTO"),
    (3, 12, "kto", "The 3 pairs are not used: DPO needs at least 10 (7 more)"),
    (2, 4, None, "8 more (an A/B vote for A or B, or an edited reply, makes one). Or 6 more thumbs up/down for KTO"),
])
def test_the_button_trains_dpo_on_pairs_kto_on_thumbs_only_or_says_what_is_missing(pairs, thumbs, method, words):
    from tuner.ui.runs_tab import training_plan

    got, said = training_plan({"pairs": pairs, "unpaired": thumbs})
    assert got == method and words in said


@pytest.mark.slow
def test_thumbs_only_train_a_kto_child_from_the_page(server, home, signoff_run):
    client = api_client(server)
    parent = _sft_copy(signoff_run, "fb-thumbs")
    for i, (prompt, reply, better) in enumerate(reviewers_pairs(12, seed=9)):
        history = [*prompt, {"role": "assistant", "content": better if i % 2 else reply}]
        client.predict(parent, "tuned", history, 1, bool(i % 2), "QA", api_name="/rate_reply")
    words, counts, _wins, _lost, need = client.predict(parent, api_name="/feedback_report")
    assert "12 thumbs (6 up)" in words and "12 thumbs up/down: ready to train with KTO" in need
    child = _value(client.predict(parent, *_settings(max_steps=2, max_length=128), api_name="/train_on_feedback"))
    state, progress = _wait(client, child, ("completed",), 1200)
    assert state == "completed", (progress, (home / "runs" / child / "train.log").read_text()[-3000:])
    assert 'data-method="kto"' in progress and "No held-out pairs to score: KTO learned from single replies" in progress
    status = Run(home / "runs" / child).status()
    assert status["method"] == "kto" and status["step"] == 2 and status["train_rows"] == 12
    assert "KTOTrainer" in (home / "runs" / child / "adapter" / "README.md").read_text()  # the card names it
    assert "| kind | KTO run |" in client.predict(child, api_name="/run_details")
    assert {r["run"]: r for r in _table(client)}[child]["came from"] == "signoff-run-data → fb-thumbs (SFT) → KTO"


def test_the_voice_line_of_a_preference_result_reads_as_one_sentence():
    """Session 16's screenshot: with no habit to check, the page said "the parent No phrase recurs ... playground.;
    this run No phrase recurs ... playground.." The voice check's own sentences, as the page puts them together."""
    from tuner.train.voicecheck import _no_verdict
    from tuner.ui.runs_tab import preference_sentences

    base = {"preference": {"beta": 0.1}, "preference_metrics": {"held_out_pairs": 0}, "method": "kto"}
    none = _no_verdict(None, [])["sentence"]
    line = preference_sentences({**base, "voice": {"sentence": none}, "voice_parent": {"sentence": none}})[-1]
    assert line == f"Voice check on new questions: {none}" and ".." not in line
    verdict = "ends like your agents on 8 of 8 new questions (base: 0); general text perplexity +11%."
    line = preference_sentences({**base, "voice": {"sentence": verdict},
                                 "voice_parent": {"sentence": verdict.replace("8 of 8", "7 of 8")}})[-1]
    assert line == ("Voice check on new questions: the parent ends like your agents on 7 of 8 new questions (base: "
                    "0); general text perplexity +11%; this run ends like your agents on 8 of 8 new questions "
                    "(base: 0); general text perplexity +11%.")
