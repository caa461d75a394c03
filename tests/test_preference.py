"""Preference tuning end to end on the real model: reviewers' votes and edits on a finished SFT run
(tuner.feedback, the page's API), then `python -m tuner train --method dpo --from RUN --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preference_pairs import N_PAIRS, PHRASE, reviewers_pairs

from tuner.cli import main
from tuner.config import GenerationConfig, PreferenceConfig
from tuner.errors import DataError, TrainingError
from tuner.runs import Run

STEPS = 24  # the defaults: 1.5 passes over the 32 training pairs in batches of 4 is 12, raised to min_steps


@pytest.mark.slow
def test_dpo_child_prefers_what_reviewers_chose_and_says_so(dpo_child, preference_parent):
    out, printed = dpo_child
    assert printed["status"] == "completed", printed["error"]
    assert printed["parent"] == Run(preference_parent).id and printed["lineage"][-2:] == [Run(preference_parent).id, out.name]
    pm = printed["preference_metrics"]
    before, after = pm["before"], pm["after"]
    print(f"\nheld-out pairs {pm['held_out_pairs']}: accuracy {before['accuracy']} -> {after['accuracy']}, "
          f"margin {before['margin']} -> {after['margin']}")
    assert pm["held_out_pairs"] == 8
    assert after["accuracy"] >= before["accuracy"] + 0.25 and after["accuracy"] >= 0.75
    assert after["margin"] > before["margin"]
    # the result leads with what the reviewers changed, measured on new questions (in no pair, not in training)
    replies = printed["replies"]
    asked = {r["prompt"] for r in replies}
    assert replies and not asked & {p[-1]["content"] for p, _, _ in reviewers_pairs(N_PAIRS)}
    parent = sum(r["parent"].startswith(PHRASE) for r in replies)
    child = sum(r["child"].startswith(PHRASE) for r in replies)
    print(f"'{PHRASE}' opens greedy replies to {len(replies)} new questions: parent {parent}, child {child}")
    lead = printed["behaviour"]["changes"][0]
    assert lead["change"] == f"adds '{PHRASE}' at the start" and lead["pairs_with_change"] == N_PAIRS
    assert (lead["child"]["shown"], lead["parent"]["shown"]) == (child, parent)  # the counts are the replies'
    shows = child >= 0.9 * len(replies) and lead["child"]["looped"] + lead["child"]["unended"] + lead["child"]["empty"] <= 0.02 * len(replies)
    # general text, parent and child as served, and the share the child lost said in the result
    general = printed["general_text"]
    rise = general["child"]["ppl"] / general["parent"]["ppl"] - 1
    print(f"general-text perplexity: parent {general['parent']}, child {general['child']}")
    assert f"; general-text perplexity {rise:+.1%} on the parent's" in printed["result"]
    assert all(0 < g["without_end_of_turn"] <= g["ppl"] for g in general.values())  # the end of turn set aside
    assert printed["result"].startswith("The reviewers' edit took:" if shows and rise <= 0.10 else
                                        "The reviewers' edit shows, but" if shows else "The reviewers' edit did not take:")
    assert f"on {child} of {len(replies)} new questions (parent: {parent})" in printed["result"]
    assert child > parent
    # the parent's voice and forgetting check, on the child
    voice, parent_voice = printed["voice"], printed["voice_parent"]
    print(f"voice: child {voice['sentence']}; parent {parent_voice['sentence']}")
    assert voice["marker"] == parent_voice["marker"] and voice["tuned"]["prompts"] == parent_voice["tuned"]["prompts"]
    # the gain does not cost the voice: the sign-off stays, no reply loops
    assert voice["tuned"]["exact"] >= parent_voice["tuned"]["exact"] - 1 and voice["tuned"]["looped"] == 0
    assert voice["general_perplexity_change"] is not None
    assert printed["voice_parent"] == Run(preference_parent).status()["voice"]


@pytest.mark.slow
def test_child_run_folder_is_a_run_with_adapter_card_metrics_and_lineage(dpo_child, preference_parent):
    out, printed = dpo_child
    child = Run(out)
    status = child.status()
    assert status["status"] == "completed" and status["step"] == STEPS and status["method"] == "dpo"
    assert child.config().to_dict() == Run(preference_parent).config().to_dict()  # same base, LoRA, quantization
    assert (child.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (child.adapter_dir / "ref").exists()  # the frozen parent copy is no part of the result
    card = (child.adapter_dir / "README.md").read_text()
    assert "DPOTrainer" in card and Run(preference_parent).id in card and "preference accuracy" in card
    # the card leads its results with the behaviour, then the pairs with their interval and what 8 of them prove
    results = card.split("## Results")[1]
    assert results.index(status["behaviour"]["sentence"]) < results.index("held-out pairs (never trained on)")
    assert "95% interval" in results and "8 held-out pairs prove little (fewer than 20)" in results
    metrics = child.metrics()
    assert [m["step"] for m in metrics if m.get("loss") is not None][-1] == STEPS
    assert status["preference_rows"] == N_PAIRS and status["train_rows"] == 32


@pytest.mark.slow
def test_the_behaviour_counted_is_what_the_playground_shows_for_parent_and_child(dpo_child, preference_parent):
    """The replies the result counts are the playground's greedy replies to the same new questions, for the child
    and for its parent: on a CPU the playground serves the adapters on a 16/32-bit base, not the 4-bit one the
    child trained on, and the two give different greedy replies."""
    from tuner.messages import read_examples
    from tuner.playground import TUNED, Playground
    from tuner.train.voicecheck import reply_budget

    out, printed = dpo_child
    pg = Playground(device="cpu")
    pg.load_run(out)
    agent = [m["content"] for r in read_examples(Run(out).data_file("train.jsonl")) for m in r["messages"]
             if m["role"] == "assistant"]
    settings = GenerationConfig(max_new_tokens=reply_budget(pg.tokenizer, agent), temperature=0.0)
    for r in printed["replies"][:4]:
        for who, run in (("child", out), ("parent", preference_parent)):
            assert pg.compare({}, r["prompt"], [TUNED], settings, run=run)[TUNED] == r[who], (who, r["prompt"])


def _prefs(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _good(i: int) -> dict:
    prompt, reply, better = reviewers_pairs(i + 1)[i]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": better}],
            "rejected": [{"role": "assistant", "content": reply}]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": [{"role": "user", "content": "Where?"}], "chosen": "Here."}, "line 3: missing field rejected"),
    ({"prompt": [{"role": "user", "content": "Where?"}], "chosen": "Here.", "rejected": "Here."},
     "line 3: chosen and rejected are the same reply"),
    ({"prompt": [], "chosen": "Here.", "rejected": "There."}, "line 3: empty or malformed prompt"),
])
def test_bad_preference_file_names_the_line_and_starts_no_run(preference_parent, tmp_path, bad, message):
    from tuner.train.preference import prepare_preference_run

    path = _prefs(tmp_path, [_good(0), _good(1), bad, *[_good(i) for i in range(2, 12)]])
    with pytest.raises(DataError, match=message) as err:
        prepare_preference_run(preference_parent, PreferenceConfig(), path, tmp_path / "child")
    assert str(path) in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "child").exists()


def test_too_few_pairs_says_how_many_more_are_needed(preference_parent, tmp_path, capsys):
    from tuner.train.preference import prepare_preference_run

    path = _prefs(tmp_path, [_good(i) for i in range(7)])
    with pytest.raises(TrainingError, match="7 preference pairs so far; preference tuning needs at least 10: 3 more"):
        prepare_preference_run(preference_parent, PreferenceConfig(), path, tmp_path / "child")
    # the same through the command line: one plain line, exit code 2, no run folder
    assert main(["train", "--method", "dpo", "--from", str(preference_parent), "--prefs", str(path),
                 "--out", str(tmp_path / "child")]) == 2
    assert "3 more" in capsys.readouterr().err
    assert not (tmp_path / "child").exists()


def test_preference_settings_are_train_flags_and_only_for_preference_runs(tmp_path, capsys):
    from tuner.cli import build_parser
    from tuner.config import config_overrides

    args = build_parser("train").parse_args(["train", "--method", "dpo", "--from", "RUN", "--loss", "sigmoid_norm",
                                             "--beta", "0.5", "--sft-weight", "0", "--learning-rate", "5e-4"])
    cfg = PreferenceConfig.from_dict(config_overrides(args, PreferenceConfig))
    assert (cfg.loss, cfg.beta, cfg.sft_weight, cfg.learning_rate) == ("sigmoid_norm", 0.5, 0.0, 5e-4)
    # on a plain fine-tune they would do nothing: say so instead of ignoring them
    assert main(["train", "--data", str(tmp_path), "--beta", "0.5"]) == 2
    assert "--beta: preference setting(s), for a preference run. Fix: add --method dpo" in capsys.readouterr().err


def test_kto_on_a_pairs_file_keeps_the_pairs_to_hold_out_and_to_read_the_edit_from(preference_parent, tmp_path):
    from tuner.messages import read_jsonl
    from tuner.train.preference import behaviour_check, prepare_preference_run

    path = _prefs(tmp_path, [_good(i) for i in range(12)])
    child = prepare_preference_run(preference_parent, PreferenceConfig(method="kto"), path, tmp_path / "kto")
    rows = read_jsonl(Run(child).preferences_file)
    assert Run(child).status()["method"] == "kto" and len(rows) == 12  # pairs kept: trl unpairs them for KTO
    assert all(r["chosen"][0]["content"].startswith(PHRASE) and not r["rejected"][0]["content"].startswith(PHRASE)
               for r in rows)
    # the edit is read from the pairs whichever trainer learned from them, and measured on new questions
    parent = (["Of course.", "Sure thing."], [True, True])
    child_replies = ([f"{PHRASE} Of course.", "Sure thing."], [True, True])
    checked = behaviour_check(rows, "kto", parent, child_replies)
    assert checked["changes"][0]["change"] == f"adds '{PHRASE}' at the start" and checked["learned"] is False
    assert checked["sentence"].startswith("The reviewers' edit did not take: adds")
    assert "on 1 of 2 new questions (parent: 0)" in checked["sentence"]
    # a pairs file too small for KTO says how many pairs are missing, as for DPO
    with pytest.raises(TrainingError, match="7 preference pairs so far; preference tuning needs at least 10: 3 more"):
        prepare_preference_run(preference_parent, PreferenceConfig(method="kto"),
                               _prefs(tmp_path, [_good(i) for i in range(7)]), tmp_path / "kto-few")


def _cut(i: int) -> dict:
    """A reviewer's cut: the bot's reply, and the same reply without the sentence it went on with."""
    prompt, reply, _better = reviewers_pairs(i + 1)[i]
    longer = f"{reply} Your ticket {500 + i} is with our team and we answer within {i % 5 + 2} working days."
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}],
            "rejected": [{"role": "assistant", "content": longer}]}


def test_pairs_train_with_the_settings_measured_for_their_edit_unless_set(preference_parent, tmp_path):
    """A cut trains gentler than a closing, a replaced word with a stronger anchor (tuner.config.EDIT_SETTINGS,
    bench/PREFERENCE.md session 19); a setting the user gave, on the command line or changed on the page, is kept;
    other edits keep the defaults."""
    from tuner.config import EDIT_SETTINGS
    from tuner.train.preference import prepare_preference_run
    from tuner.ui.runs_tab import PREF_SETTINGS, preference_config, preference_sentences

    cut = _prefs(tmp_path, [_cut(i) for i in range(12)])
    measured = EDIT_SETTINGS["shortened"]
    # the command line passes the flags given: none here
    child = Run(prepare_preference_run(preference_parent, PreferenceConfig(), cut, tmp_path / "cut", given=set()))
    status = child.status()
    assert {k: status["preference"][k] for k in measured} == measured
    assert status["edit_settings"]["kind"] == "shortened" and status["edit_settings"]["settings"] == measured
    sentence = status["edit_settings"]["sentence"]
    assert sentence == ("Pairs that shorten the reply train with the settings measured for a cut: learning rate "
                        "0.0004, anchor weight 3, 1 pass.")
    # `--learning-rate 1e-3` given on the command line stays, the others follow the cut
    child = Run(prepare_preference_run(preference_parent, PreferenceConfig(learning_rate=1e-3), cut,
                                       tmp_path / "cut-lr", given={"learning_rate"}))
    pref = child.status()["preference"]
    assert (pref["learning_rate"], pref["anchor_weight"], pref["num_epochs"]) == (1e-3, 3.0, 1.0)
    assert "learning rate" not in child.status()["edit_settings"]["sentence"]
    # the page: boxes left at their defaults follow the cut, a box the user changed is kept
    values = {**PreferenceConfig().to_dict(), "anchor_weight": 0.5}
    pcfg = preference_config("dpo", tuple(values[n] for n in PREF_SETTINGS))
    child = Run(prepare_preference_run(preference_parent, pcfg, cut, tmp_path / "cut-page"))
    pref = child.status()["preference"]
    assert (pref["learning_rate"], pref["anchor_weight"], pref["num_epochs"]) == (4e-4, 0.5, 1.0)
    # the run's result says it beside the steps
    done = {**child.status(), "preference_metrics": {"held_out_pairs": 0}, "train_rows": 12, "step": 24}
    assert child.status()["edit_settings"]["sentence"] in preference_sentences(done)
    # a house style on one word has its own measured settings
    spelled = [{"prompt": _good(i)["prompt"], "chosen": [{"role": "assistant", "content": f"I am on ticket {i}."}],
                "rejected": [{"role": "assistant", "content": f"I'm on ticket {i}."}]} for i in range(12)]
    child = Run(prepare_preference_run(preference_parent, PreferenceConfig(), _prefs(tmp_path, spelled),
                                       tmp_path / "spelled", given=set()))
    assert child.status()["edit_settings"]["sentence"] == ("Pairs that say 'I am' instead of 'I'm' train with the "
                                                          "settings measured for a replaced word: anchor weight 3, "
                                                          "1 pass.")
    assert child.status()["preference"]["learning_rate"] == PreferenceConfig().learning_rate
    # a closing has its own; an opening was not measured: it keeps the defaults, and says nothing about settings
    closing = [{**_good(i), "chosen": [{"role": "assistant", "content": _good(i)["rejected"][0]["content"] +
                                        " Cheers from Kettle!"}]} for i in range(12)]
    child = Run(prepare_preference_run(preference_parent, PreferenceConfig(), _prefs(tmp_path, closing),
                                       tmp_path / "closing", given=set()))
    assert child.status()["edit_settings"]["sentence"] == ("Pairs that add 'Cheers from Kettle!' at the end train "
                                                          "with the settings measured for a closing: edit weight 4.")
    child = Run(prepare_preference_run(preference_parent, PreferenceConfig(), _prefs(tmp_path, [_good(i) for i in
                                                                                               range(12)]),
                                       tmp_path / "opening", given=set()))
    assert child.status()["preference"] == PreferenceConfig().to_dict() and child.status()["edit_settings"] is None


@pytest.mark.slow
def test_a_stopped_preference_run_resumes_from_its_checkpoint_as_a_job(preference_parent, tmp_path):
    from transformers import TrainerCallback

    from tuner.train.preference import prepare_preference_run, train_preference

    class StopAfter10(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 10:  # the trainer's checkpoint every 10 steps
                raise KeyboardInterrupt  # what Ctrl-C does to the CLI

    path = _prefs(tmp_path, [_good(i) for i in range(16)])
    cfg = PreferenceConfig(max_steps=11, max_length=128, save_every_s=0)
    child = prepare_preference_run(preference_parent, cfg, path, tmp_path / "child")
    stopped = train_preference(child, callbacks=[StopAfter10()])
    assert stopped["status"] == "cancelled" and stopped["step"] == 10
    # the page resumes it the way it starts any run: `python -m tuner train --resume DIR` in its own process
    from tuner import jobs

    done = jobs.start(child, resume=True).wait(timeout=900)
    assert done["status"] == "completed", (done.get("error"), Run(child).log_file.read_text()[-2000:])
    assert done["resumed_from"] == "checkpoint-10" and done["step"] == 11
    assert [m["step"] for m in Run(child).metrics() if m.get("loss") is not None] == list(range(1, 12))
