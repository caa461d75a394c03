"""tuner.train.voicecheck's final verdict: graded on the replies the playground serves, the base's kept once."""

from __future__ import annotations

import json

import pytest
from conftest import SIGN_OFF

from tuner import replycache
from tuner.config import GenerationConfig
from tuner.playground import BASE, TUNED, Playground
from tuner.precision import serving_dtype
from tuner.train.voicecheck import base_cache_key, final_verdict
from tuner.verdict import Marker

MAX_NEW = 40
# of very different lengths, so a batch of them is left-padded; none is in the training data
PROMPTS = [[{"role": "user", "content": text}] for text in (
    "Hi.",
    "Hello, my parcel never arrived and the tracking page has said 'in transit' for nine days now; "
    "I ordered two Halo lamps and a spare shade as a birthday present. What can you do?",
    "Can I change my delivery address?",
    "Do you have a shop in Berlin, or anywhere in Germany where I could see the lamps before buying?",
    "Is there a student discount?",
)]


@pytest.fixture(scope="module")
def pg(signoff_run):
    playground = Playground(device="cpu")
    playground.load_run(signoff_run)
    return playground


def test_the_playground_serves_in_the_dtype_the_product_chose_here(pg):
    assert pg.model.get_input_embeddings().weight.dtype == serving_dtype("cpu")


def test_batched_greedy_replies_do_not_depend_on_padding(pg, signoff_run):
    settings = GenerationConfig(max_new_tokens=MAX_NEW)
    batched = pg.answers(PROMPTS, [BASE, TUNED], settings, signoff_run)
    for column in (BASE, TUNED):
        alone = [pg.reply([], p[-1]["content"], column, settings, run=signoff_run) for p in PROMPTS]
        assert batched[column][0] == alone, column
    assert sum(SIGN_OFF in r for r in batched[TUNED][0]) >= 4 and not any(SIGN_OFF in r for r in batched[BASE][0])


def test_the_verdict_is_what_the_playground_shows_and_asks_the_base_once(pg, signoff_run):
    marker = Marker("sign-off", SIGN_OFF)
    key = base_cache_key(pg, signoff_run, PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0))
    first = final_verdict(pg, signoff_run, marker, PROMPTS, MAX_NEW)
    assert first["timing"]["base_replies"] == "decoded" and first["timing"]["rows_decoded"] == 2 * len(PROMPTS)
    # what a user comparing base and tuned in the playground sees for each prompt, greedy
    settings = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    for example, prompt in zip(first["examples"], PROMPTS, strict=True):
        shown = pg.compare({}, prompt[-1]["content"], [BASE, TUNED], settings, run=signoff_run)
        assert (example["base"], example["tuned"]) == (shown[BASE], shown[TUNED])
    assert first["tuned"]["exact"] >= 4 and first["base"]["exact"] == 0
    assert first["chrf"] is None and "chrF" not in first["sentence"]  # no agent ever answered these prompts

    # the next run on this base asks only the result: the base's replies come from TUNER_HOME
    stored = replycache.read(key)
    assert stored is not None and stored["replies"] == [e["base"] for e in first["examples"]]
    second = final_verdict(pg, signoff_run, marker, PROMPTS, MAX_NEW)
    assert second["timing"]["base_replies"] == "cached" and second["timing"]["rows_decoded"] == len(PROMPTS)
    assert {k: second[k] for k in ("tuned", "base", "examples", "general_perplexity", "sentence")} == \
        {k: first[k] for k in ("tuned", "base", "examples", "general_perplexity", "sentence")}


def test_the_base_replies_are_kept_per_model_prompts_and_settings(pg, signoff_run, tmp_path):
    settings = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0)
    key = base_cache_key(pg, signoff_run, PROMPTS, settings)
    assert base_cache_key(pg, signoff_run, PROMPTS, settings) == key
    assert base_cache_key(pg, signoff_run, PROMPTS[:-1], settings) != key
    assert base_cache_key(pg, signoff_run, PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW + 1, temperature=0.0)) != key
    # another copy of the weights (a changed file) is another model
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"a": 1}))
    before = replycache.weights_fingerprint(model_dir)
    (model_dir / "config.json").write_text(json.dumps({"a": 22}))
    assert replycache.weights_fingerprint(model_dir) != before
    # a broken entry is no entry
    replycache.write("k", {"replies": ["a"], "ended": [True, False]})
    assert replycache.read("k") is None


def test_the_verdict_says_how_close_the_replies_are_to_the_agents_own(pg, signoff_run):
    from tuner.evaluate import chrf
    from tuner.messages import read_examples
    from tuner.runs import Run
    from tuner.train.voicecheck import held_out_prompts, held_out_references
    from tuner.verdict import closeness_clause

    run = Run(signoff_run)
    train, val = read_examples(run.data_file("train.jsonl")), read_examples(run.data_file("validation.jsonl"))
    prompts = held_out_prompts(train, val, 4, seed=0)
    refs = held_out_references(prompts, val)
    asked = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in val}
    assert refs == [asked[p[-1]["content"]] for p in prompts] and all(SIGN_OFF in r for r in refs)

    verdict = final_verdict(pg, signoff_run, Marker("sign-off", SIGN_OFF), prompts, MAX_NEW)
    close, shown = verdict["chrf"], verdict["examples"]
    assert close["references"] == 4
    marker = Marker("sign-off", SIGN_OFF)  # scored on the content: the sign-off out of replies and references
    assert close["tuned"] == chrf([e["tuned"] for e in shown], refs, marker)
    assert close["base"] == chrf([e["base"] for e in shown], refs, marker)
    assert closeness_clause(close["tuned"], close["base"]) in verdict["sentence"]
    # the sign-off the tuned replies learned earns nothing here: left in, it would have raised their score
    assert close["tuned"] < chrf([e["tuned"] for e in shown], refs)


def test_a_reply_given_up_to_a_word_goes_on_with_the_words_the_model_said_there(pg, signoff_run):
    """How a preference run tells a replaced word's overuse (tuner.edits.term_sites): the parent is given the child's
    reply up to the word and asked what it says next. Given its own greedy reply up to a word, a model goes on with
    that reply's next words."""
    from tuner.train.voicecheck import generate

    with pg.column_model(TUNED, signoff_run) as model:
        template = pg.tokenizer.chat_template
        replies, _ = generate(model, pg.tokenizer, template, PROMPTS, MAX_NEW)
        cuts = [r[:r.index(" ", len(r) // 3)] for r in replies]  # up to a word a third of the way in
        goes_on, _ = generate(model, pg.tokenizer, template, PROMPTS, 4, prefixes=cuts)
    for reply, cut, more in zip(replies, cuts, goes_on, strict=True):
        assert more and reply[len(cut):].lstrip().startswith(more), (reply, cut, more)
