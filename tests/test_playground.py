"""The playground: base vs tuned from one copy of the weights, streamed, trimmed, thread-safe."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from conftest import SIGN_OFF

from tuner.config import GenerationConfig
from tuner.errors import ModelError, TunerError
from tuner.playground import BASE, NOTICE_KEY, PROMPTED, TUNED, Playground, fit_messages, read_run

SETTINGS = GenerationConfig(max_new_tokens=16)
# none of these topics is in the training data (lamps, orders, returns... phrased differently)
UNSEEN = ["Hello, my parcel never arrived.", "Can I change my delivery address?", "Do you have a shop in Berlin?",
          "How long is the guarantee?", "Can I pay with PayPal?", "Is there a student discount?"]


@pytest.fixture(scope="module")
def pg(signoff_run):
    playground = Playground()
    playground.load_run(signoff_run)
    return playground


@pytest.fixture(scope="module")
def plain_model(default_model_path):
    """A second, separately loaded copy of the base model, in the dtype the product serves it in on this
    machine (tuner.precision.serving_dtype): the reference the playground must match."""
    from tuner.models import load_model
    from tuner.precision import serving_dtype

    return load_model("default", quantization="none", dev="cpu", dtype=serving_dtype("cpu"))


def greedy(model, tokenizer, prompt: str, settings: GenerationConfig = SETTINGS, **kwargs) -> str:
    batch = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=settings.max_new_tokens, do_sample=False,
                         repetition_penalty=settings.repetition_penalty, **kwargs)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_tuned_column_signs_off_like_the_brand_on_unseen_prompts_and_base_does_not(pg):
    settings = GenerationConfig(max_new_tokens=40)
    replies = pg.generate_many([[{"role": "user", "content": p}] for p in UNSEEN], [BASE, TUNED], settings)
    tuned = sum(SIGN_OFF in r[TUNED] for r in replies)
    base = sum(SIGN_OFF in r[BASE] for r in replies)
    assert tuned >= len(UNSEEN) - 1, replies
    assert base == 0, replies
    assert all(r[BASE] != r[TUNED] for r in replies)


def test_base_and_tuned_come_from_one_copy_of_the_weights(pg, plain_model, signoff_run, tmp_path_factory):
    import psutil
    from peft import PeftModel

    # every LoRA layer wraps the base weight in place: the base parameters are one model's worth
    base_params = {p.data_ptr(): p.numel() for n, p in pg.model.named_parameters() if "lora_" not in n}
    plain = {p.data_ptr(): p.numel() for p in plain_model.parameters()}
    assert sum(base_params.values()) == sum(plain.values())
    assert isinstance(pg.model, PeftModel)

    # a second run on the same base: new adapter, same base tensors, no reload
    other = signoff_run.parent / "signoff-run.second"
    if not other.exists():
        shutil.copytree(signoff_run, other)
    loads = pg.base_loads
    rss = psutil.Process().memory_info().rss
    pg.load_run(other)
    growth = psutil.Process().memory_info().rss - rss
    after = {p.data_ptr(): p.numel() for n, p in pg.model.named_parameters() if "lora_" not in n}
    assert pg.base_loads == loads
    assert after == base_params
    model_bytes = sum(plain.values()) * 4
    assert growth < 0.1 * model_bytes, f"loading a second adapter grew RSS by {growth / 1e6:.0f} MB"
    # both adapters answer, each with its own run, from the same base
    both = pg.compare({}, UNSEEN[0], [TUNED], SETTINGS, run=other)
    assert both[TUNED] == pg.reply([], UNSEEN[0], TUNED, SETTINGS, run=signoff_run)
    pg.load_run(signoff_run)


def test_base_column_is_the_plain_model_and_tuned_is_a_separate_peft_model(pg, plain_model, signoff_run):
    from peft import PeftModel

    prompt = UNSEEN[1]
    expected_base = greedy(plain_model, pg.tokenizer, prompt)
    assert pg.reply([], prompt, BASE, SETTINGS) == expected_base

    tuned_model = PeftModel.from_pretrained(plain_model, str(read_run(signoff_run).adapter_dir))
    tuned_model.eval()
    expected_tuned = greedy(tuned_model, pg.tokenizer, prompt)
    assert pg.reply([], prompt, TUNED, SETTINGS) == expected_tuned
    assert expected_tuned != expected_base


def test_compare_mode_rows_equal_single_column_replies(pg):
    prompt = UNSEEN[2]
    together = pg.compare({}, prompt, [BASE, TUNED, PROMPTED], SETTINGS)
    for column in (BASE, TUNED, PROMPTED):
        assert together[column] == pg.reply([], prompt, column, SETTINGS), column
    # the prompted column is the base told the brand brief, and the brief names the mined sign-off
    assert SIGN_OFF in pg.run.brand_brief


def test_replies_stream_word_by_word_without_template_tokens(pg):
    partials = list(pg.stream_compare({}, UNSEEN[3], [BASE, TUNED], SETTINGS))
    assert len(partials) > 4  # incremental, not one final chunk
    for before, after in zip(partials, partials[1:], strict=False):
        for column in (BASE, TUNED):
            assert after[column].startswith(before[column])
    final = partials[-1]
    assert final == pg.compare({}, UNSEEN[3], [BASE, TUNED], SETTINGS)
    for partial in partials:
        for text in partial.values():
            assert "<|im_" not in text and "<|" not in text
    assert NOTICE_KEY not in final
    single = list(pg.stream([], UNSEEN[3], TUNED, SETTINGS))
    assert len(single) > 2 and single[-1] == final[TUNED]


def test_each_column_keeps_its_own_history(pg):
    first = pg.compare({}, "Hi, my lamp flickers.", [BASE, TUNED], SETTINGS)
    history = {c: [{"role": "user", "content": "Hi, my lamp flickers."}, {"role": "assistant", "content": first[c]}]
               for c in (BASE, TUNED)}
    second = pg.compare(history, "Thanks. And the cable?", [BASE, TUNED], SETTINGS)
    for column in (BASE, TUNED):
        assert second[column] == pg.reply(history[column], "Thanks. And the cable?", column, SETTINGS)


def test_long_conversations_are_trimmed_from_the_oldest_turn_with_a_notice(pg):
    tok = pg.tokenizer
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question number {i} about my lamp order and its delivery."},
                    {"role": "assistant", "content": f"Answer number {i}: it ships tomorrow from our workshop."}]
    messages = history + [{"role": "user", "content": "So when does it arrive?"}]
    fitted, notice = fit_messages(tok, messages, 120)
    assert notice and "120 tokens" in notice and "oldest" in notice
    assert fitted[-1] == messages[-1] and fitted[0]["role"] == "user"
    assert fitted == messages[len(messages) - len(fitted):]  # the newest turns survive, in order
    assert len(tok.apply_chat_template(fitted, add_generation_prompt=True, return_dict=True)["input_ids"]) <= 120
    assert fit_messages(tok, messages[-3:], 120) == (messages[-3:], None)

    # one message longer than the limit keeps its end (the question) and says so
    long = [{"role": "user", "content": "blah " * 400 + "Where is my parcel?"}]
    fitted, notice = fit_messages(tok, long, 100)
    assert fitted[-1]["content"].endswith("Where is my parcel?") and "cut" in notice

    old = pg.max_input_tokens
    pg.max_input_tokens = 120
    try:
        partials = list(pg.stream_compare({BASE: history, TUNED: history}, "So when does it arrive?", [BASE, TUNED],
                                          GenerationConfig(max_new_tokens=8)))
    finally:
        pg.max_input_tokens = old
    assert all("120 tokens" in p[NOTICE_KEY] for p in partials)
    assert partials[-1][TUNED]


def test_concurrent_sessions_get_the_same_replies_as_one_at_a_time(pg):
    settings = GenerationConfig(max_new_tokens=12)
    jobs = [(UNSEEN[4], BASE), (UNSEEN[4], TUNED), (UNSEEN[5], TUNED)]
    alone = [pg.reply([], p, c, settings) for p, c in jobs]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        try:
            prompt, column = jobs[i]
            results[i] = pg.reply([], prompt, column, settings)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [results[i] for i in range(len(jobs))] == alone


def test_closing_a_stream_stops_generation_and_frees_the_model(pg):
    stream = pg.stream_compare({}, UNSEEN[0], [BASE, TUNED], GenerationConfig(max_new_tokens=400))
    next(stream)
    stream.close()
    started = time.monotonic()
    assert pg._lock.acquire(timeout=30)
    pg._lock.release()
    assert time.monotonic() - started < 30


def test_settings_validate_and_sampling_is_repeatable(pg):
    with pytest.raises(TunerError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(TunerError, match="column"):
        pg.compare({}, "hi", ["nonsense"], SETTINGS)
    lively = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=7)
    assert pg.reply([], UNSEEN[0], BASE, lively) == pg.reply([], UNSEEN[0], BASE, lively)


@pytest.mark.parametrize("breakage, error", [
    ("pickle", "pickle"), ("running", "not completed"), ("outside", "inside the run"), ("no-adapter", "no adapter"),
])
def test_load_run_refuses_unsafe_or_unfinished_runs(signoff_run, tmp_path, breakage, error):
    run = tmp_path / "broken"
    shutil.copytree(signoff_run, run)
    status = json.loads((run / "status.json").read_text())
    adapter = read_run(run).adapter_dir
    assert adapter.parent == run  # a copied run uses its own adapter, whatever status.json says
    if breakage == "pickle":
        (adapter / "adapter_model.bin").write_bytes(b"not really a pickle")
    elif breakage == "running":  # training again: a (re)started run has saved nothing yet
        status["status"], status["saved_at"] = "running", None
    elif breakage == "outside":
        status["adapter"] = str(tmp_path)
    else:
        status["adapter"] = None
    (run / "status.json").write_text(json.dumps(status))
    with pytest.raises((ModelError, TunerError), match=error):
        Playground().load_run(run)


def test_chat_cli_compares_in_json(signoff_run, capsys):
    from tuner.cli import main

    code = main(["chat", "--run", str(signoff_run), "--prompt", UNSEEN[0], "--compare", "--json",
                 "--max-new-tokens", "48"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["replies"]) == {BASE, TUNED}
    assert SIGN_OFF in out["replies"][TUNED] and SIGN_OFF not in out["replies"][BASE]
    assert out["timing"]["first_token_s"] <= out["timing"]["total_s"]
    assert out["timing"]["new_tokens"][TUNED] > 0
