"""ETA end to end on tiny models of every family: decisions, alignment, cache reuse, streaming, errors."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import vlm_safety_plugins as vsp
from vlm_safety_plugins import testing
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.defenses.eta.best_of_n import GROWING_INPUTS, extend_context, prefill_cache, sentence_best_of_n
from vlm_safety_plugins.defenses.eta.defense import candidate_scores, uses_utility
from vlm_safety_plugins.scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION

from .conftest import assert_same_tokens, attach_unable_to_rebuild_images, batch, new_tokens

PREFIX = "As an AI assistant"
# Thresholds that force each verdict on the untrained tiny evaluators (cosines lie in [-1, 1]).
PRE = {"unsafe": -1.0, "safe": 1.0}
POST = {"unsafe": 1e3, "safe": -1e3}
MAX_NEW_TOKENS = 12


def eta(pre="unsafe", post="unsafe", **options):
    """A SafetyConfig running ETA with the offline tiny CLIP and reward model."""
    settings = {
        "pre_threshold": PRE[pre],
        "post_threshold": POST[post],
        "clip": {"model": "tiny-clip"},
        "reward_model": {"path": "tiny-reward-model", "trust_remote_code": False},
        "best_of_n": {"n": 3, "max_sentence_tokens": 5},
        **options,
    }
    return vsp.SafetyConfig.from_dict({"defenses": {"eta": settings}})


def run(model, inputs, config, images, **kwargs):
    gen = config.to_generation_config(
        model.generation_config, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True
    )
    return model.generate(**inputs, images=images, generation_config=gen, **kwargs)


def vanilla(model, inputs):
    return model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)


@pytest.fixture
def attached(vlm, red_image):
    model, processor = vlm
    vsp.attach(model, processor)
    return model, vsp.get_attachment(model).adapter, red_image


class Recorder(BaseStreamer):
    """Collects what a streamer receives: the prompt first, then token chunks, then end."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(torch.as_tensor(value).reshape(-1).tolist())

    def end(self):
        self.ended = True

    def answer(self):
        return [token for chunk in self.chunks[1:] for token in chunk]


# -- the decision table -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pre, post, aligned",
    [("unsafe", "unsafe", True), ("unsafe", "safe", False), ("safe", "unsafe", False), ("safe", "safe", False)],
)
def test_only_both_verdicts_unsafe_align_an_image_request(attached, pre, post, aligned):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    out = run(model, inputs, eta(pre, post), [image])
    record = out.safety[0].defenses["eta"]
    assert record.ran and record.details["aligned"] is aligned
    assert record.decision == (vsp.MODIFIED if aligned else vsp.PASS)
    assert ("post" in record.scores) is (pre == "unsafe")  # the reward model runs only after an unsafe pre-check
    answer = new_tokens(out.sequences, inputs)
    if aligned:
        prefix = adapter.response_ids(PREFIX)
        assert answer[0, : len(prefix)].tolist() == prefix
        assert record.details["sentences"] >= 1 and record.details["candidates"] == 3 * record.details["sentences"]
        assert set(record.details["time_s"]) == {"clip", "vanilla", "reward", "align", "decode", "score"}
    else:
        assert_same_tokens(out.sequences, vanilla(model, inputs))


@pytest.mark.parametrize(
    "policy, post, aligned", [("post", "unsafe", True), ("post", "safe", False), ("pass", "unsafe", False)]
)
def test_text_only_rows_follow_the_text_only_policy(attached, policy, post, aligned):
    model, adapter, _ = attached
    inputs = batch(model, adapter.processor, [("Tell me about knives.", None)])
    out = run(model, inputs, eta("safe", post, text_only=policy), None)
    record = out.safety[0].defenses["eta"]
    assert "pre" not in record.scores and record.details["aligned"] is aligned
    assert ("post" in record.scores) is (policy == "post")
    if not aligned:
        assert_same_tokens(out.sequences, vanilla(model, inputs))


def test_rows_of_a_batch_are_decided_separately(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image), ("Describe a cat.", None)])
    out = run(model, inputs, eta("unsafe", "unsafe", text_only="pass"), [[image], []])
    aligned = [report.defenses["eta"].details["aligned"] for report in out.safety]
    assert aligned == [True, False]
    prefix = adapter.response_ids(PREFIX)
    assert new_tokens(out.sequences, inputs)[0, : len(prefix)].tolist() == prefix
    reference = vanilla(model, inputs)
    row = new_tokens(out.sequences, inputs)[1]
    expected = new_tokens(reference, inputs)[1]
    assert row[: expected.shape[0]].tolist() == expected.tolist()  # then padding, if row 0 grew longer
    assert set(row[expected.shape[0] :].tolist()) <= {adapter.tokenizer.pad_token_id}


# -- the safe path ------------------------------------------------------------------------------


def test_safe_path_never_loads_the_reward_model_and_streams_live(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    missing_rm = eta("safe", "unsafe", reward_model={"path": "/nonexistent/reward-model"})
    streamer = Recorder()
    out = run(model, inputs, missing_rm, [image], streamer=streamer)
    assert not out.safety[0].refused  # loading the reward model would have failed (and refused)
    assert_same_tokens(out.sequences, vanilla(model, inputs))
    assert streamer.ended and streamer.answer() == new_tokens(out.sequences, inputs)[0].tolist()
    # the same request with an unsafe pre-check needs the reward model: fail closed, naming it
    refused = run(model, inputs, eta("unsafe", "unsafe", reward_model={"path": "/nonexistent/reward-model"}), [image])
    assert refused.safety[0].refused and "/nonexistent/reward-model" in refused.safety[0].error


def test_aligned_answer_is_streamed_and_the_vanilla_one_never_is(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    streamer = Recorder()
    out = run(model, inputs, eta("unsafe", "unsafe"), [image], streamer=streamer)
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist()
    answer = new_tokens(out.sequences, inputs)[0].tolist()
    assert streamer.ended and streamer.answer() == answer  # only the aligned answer, sentence by sentence
    assert len(streamer.chunks) >= 3  # prompt, prefix, then at least one accepted sentence


def test_buffered_answer_that_passes_is_streamed_after_the_verdict(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    streamer = Recorder()
    out = run(model, inputs, eta("unsafe", "safe"), [image], streamer=streamer)
    assert_same_tokens(out.sequences, vanilla(model, inputs))
    assert streamer.ended and streamer.answer() == new_tokens(out.sequences, inputs)[0].tolist()


# -- alignment ----------------------------------------------------------------------------------


def test_shallow_only_equals_plain_generate_with_the_prefix_processor(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    out = run(model, inputs, eta(alignment="shallow_only"), [image])
    prefix = vsp.InterferencePrefixProcessor(adapter.response_ids(PREFIX))
    vsp.detach(model)
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, logits_processor=[prefix])
    assert_same_tokens(out.sequences, expected)


@pytest.mark.parametrize("alignment", ["full", "shallow_only"])
def test_a_token_budget_inside_the_prefix_gives_the_cut_prefix_not_a_refusal(attached, alignment):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    prefix = adapter.response_ids(PREFIX)
    for budget in (len(prefix) - 1, len(prefix)):
        gen = eta(alignment=alignment).to_generation_config(
            model.generation_config, max_new_tokens=budget, return_dict_in_generate=True
        )
        out = model.generate(**inputs, images=[image], generation_config=gen)
        assert not out.safety[0].refused and out.safety[0].defenses["eta"].details["aligned"]
        assert new_tokens(out.sequences, inputs)[0].tolist() == prefix[:budget]


def test_deep_only_searches_without_the_prefix(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    out = run(model, inputs, eta(alignment="deep_only"), [image])
    record = out.safety[0].defenses["eta"]
    assert record.details["aligned"] and record.details["sentences"] >= 1
    answer = new_tokens(out.sequences, inputs)[0].tolist()
    prefix = adapter.response_ids(PREFIX)
    assert answer[: len(prefix)] != prefix


def test_seeded_alignment_is_reproducible(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(run(model, inputs, eta(), [image]).sequences)
    assert_same_tokens(*outputs)


def test_alignment_respects_the_calls_token_budget(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    out = run(model, inputs, eta(), [image])
    assert new_tokens(out.sequences, inputs).shape[1] <= MAX_NEW_TOKENS


# -- errors -------------------------------------------------------------------------------------


def test_missing_images_follow_on_error():
    model, processor = testing.tiny_vlm("llava")
    attach_unable_to_rebuild_images(model, processor)
    image = testing.tiny_image()
    inputs = batch(model, processor, [("What is in the picture?", image)])
    out = run(model, inputs, eta(), None)
    assert out.safety[0].refused and "images=" in out.safety[0].error
    with pytest.raises(vsp.DefenseError, match="images="):
        run(model, inputs, vsp.SafetyConfig.from_dict({**eta().to_dict(), "on_error": "raise"}), None)


def test_several_return_sequences_are_refused_clearly(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    config = vsp.SafetyConfig.from_dict({**eta().to_dict(), "on_error": "raise"})
    with pytest.raises(vsp.DefenseError, match="num_return_sequences=2"):
        run(model, inputs, config, [image], num_return_sequences=2, do_sample=True)


def test_bad_eta_options_name_the_key():
    with pytest.raises(vsp.ConfigError, match=r"defenses\.eta\.best_of_n\.n: -1 is out of range"):
        vsp.SafetyConfig.from_dict({"defenses": {"eta": {"best_of_n": {"n": -1}}}})
    with pytest.raises(vsp.ConfigError, match=r"defenses\.eta\.alignment: expected one of"):
        vsp.SafetyConfig.from_dict({"defenses": {"eta": {"alignment": "half"}}})


def test_shipped_configs_validate():
    assert vsp.load_config("configs/eta.yaml").defenses["eta"].pre_threshold == 0.16
    assert vsp.load_config("configs/eta-tiny.yaml").defenses["eta"].clip.model == "tiny-clip"


# -- sentence-level best-of-N, without attach ---------------------------------------------------


def test_score_rule():
    rewards, utilities = torch.tensor([0.5, -0.2]), torch.tensor([0.3, 0.9])
    assert not uses_utility(1, [False, False]) and not uses_utility(3, [False, True])
    assert uses_utility(2, [False, False])
    torch.testing.assert_close(candidate_scores(rewards, None, index=1, alpha=1.0), rewards)
    torch.testing.assert_close(candidate_scores(rewards, utilities, index=2, alpha=1.0), torch.tensor([0.65, 0.25]))


@pytest.fixture(scope="module")
def evaluators():
    return (vsp.RewardScorer(*testing.tiny_reward_model()), vsp.ClipScorer.from_open_clip(*testing.tiny_clip()))


def _row(model, processor):
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs([("What is in the picture?", testing.tiny_image())])
    context = {name: inputs[name] for name in ("input_ids", *GROWING_INPUTS) if name in inputs}
    return adapter, inputs, context


def test_best_candidate_by_the_score_rule_wins(family, evaluators):
    model, processor = testing.tiny_vlm(family)
    adapter, inputs, context = _row(model, processor)
    reward, clip = evaluators
    image = clip.embed_images([testing.tiny_image()])
    rounds = []

    def score(candidates, index, accepted):
        responses = adapter.tokenizer.batch_decode([accepted + ids for ids in candidates.token_ids])
        utilities = (
            clip.similarity(clip.embed_texts(candidates.texts), image)[:, 0]
            if uses_utility(index, candidates.ended_with_eos)
            else None
        )
        scores = candidate_scores(
            reward.score([BEST_OF_N_INSTRUCTION] * len(responses), responses), utilities, index=index, alpha=1.0
        )
        rounds.append((candidates.token_ids, scores))
        return scores

    torch.manual_seed(0)
    cache = prefill_cache(model.generate, model.config, inputs)
    result = sentence_best_of_n(
        model.generate,
        adapter.tokenizer,
        context,
        score,
        cache=cache,
        n=4,
        top_k=5,
        temperature=1.5,
        max_sentence_tokens=4,
        max_new_tokens=10,
        boundary="text",
        eos_token_id=model.generation_config.eos_token_id,
    )
    winners = [candidates[int(torch.argmax(scores))] for candidates, scores in rounds]
    assert result.token_ids == [token for winner in winners for token in winner]
    assert result.sentences == len(rounds) and result.candidates == 4 * len(rounds)
    assert any(len({tuple(ids) for ids in candidates}) > 1 for candidates, _ in rounds)  # really sampled


def test_continuing_from_the_winners_cache_equals_a_fresh_greedy_generate(family):
    model, processor = testing.tiny_vlm(family)
    adapter, inputs, context = _row(model, processor)
    torch.manual_seed(0)
    cache = prefill_cache(model.generate, model.config, inputs)
    result = sentence_best_of_n(
        model.generate,
        adapter.tokenizer,
        context,
        lambda c, i, a: torch.arange(3.0),
        cache=cache,
        n=3,
        top_k=5,
        temperature=1.5,
        max_sentence_tokens=3,
        max_new_tokens=6,
        boundary="text",
        eos_token_id=[],
    )
    grown = extend_context(context, result.token_ids)
    cached = model.generate(**grown, past_key_values=cache, max_new_tokens=6, do_sample=False)
    fresh = model.generate(**{**inputs, **grown}, max_new_tokens=6, do_sample=False)
    assert len(result.token_ids) == 6
    assert_same_tokens(cached, fresh)


def test_alignment_keeps_other_defenses_steering_each_row_as_its_own(attached, register):
    model, adapter, image = attached
    hidden = adapter.hidden_size()
    steering = [vsp.AddVector({1: torch.linspace(-3, 3, hidden)}, rows=[True, False], scope="all")]

    class SteerFirstRow(vsp.Defense):
        name = "steer_first_row_test"

        def interventions(self, call):
            return steering

    register(SteerFirstRow)
    inputs = batch(model, adapter.processor, [("What is in the picture?", image), ("Describe a cat.", None)])
    config = vsp.SafetyConfig.from_dict(
        {
            "defenses": {
                **eta(alignment="shallow_only", text_only="pass").to_dict()["defenses"],
                "steer_first_row_test": {},
            }
        }
    )
    out = run(model, inputs, config, [[image], []])
    assert [report.defenses["eta"].details["aligned"] for report in out.safety] == [True, False]
    prefix = vsp.InterferencePrefixProcessor(adapter.response_ids(PREFIX))
    hooks = vsp.get_attachment(model).hooks
    with hooks.activate(steering, prompt_length=inputs["input_ids"].shape[1], batch_size=2):
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, logits_processor=[prefix])
    assert new_tokens(out.sequences, inputs)[0].tolist() == new_tokens(expected, inputs)[0].tolist()


def test_reward_model_can_see_the_users_question(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    answer = adapter.tokenizer.decode(new_tokens(vanilla(model, inputs), inputs)[0], skip_special_tokens=True)
    reward = vsp.RewardScorer(*testing.tiny_reward_model())
    for sees, user_turn in (("instruction", POST_EVAL_INSTRUCTION), ("question", "What is in the picture?")):
        out = run(model, inputs, eta("unsafe", "safe", reward_sees=sees), [image])
        expected = float(reward.score([user_turn], [answer])[0])
        assert out.safety[0].defenses["eta"].scores["post"] == pytest.approx(expected, abs=1e-5)


def test_prompt_derived_steering_lasts_through_every_best_of_n_sentence(attached, register):
    """With N = 1 and top-k 1 the search is greedy decoding cut into sentences: it must equal
    one plain generate with the prefix forced and the same gated, prompt-derived steering."""
    model, adapter, image = attached
    torch.manual_seed(3)
    basis = torch.linalg.qr(torch.randn(adapter.hidden_size(), 2))[0].T  # 2 orthonormal rows
    steering = [vsp.AddPromptProjection({1: basis, 2: basis}, alpha=40.0, gate=vsp.Gate(1, lambda p: p[:, 0] < 1e9))]

    class AmplifyPrompt(vsp.Defense):
        name = "amplify_prompt_test"

        def interventions(self, call):
            return steering

    register(AmplifyPrompt)
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    settings = eta(best_of_n={"n": 1, "top_k": 1, "max_sentence_tokens": 3}).to_dict()["defenses"]
    config = vsp.SafetyConfig.from_dict({"defenses": {**settings, "amplify_prompt_test": {}}})
    out = run(model, inputs, config, [image])
    assert out.safety[0].defenses["eta"].details["sentences"] >= 2
    prefix = vsp.InterferencePrefixProcessor(adapter.response_ids(PREFIX))
    with vsp.get_attachment(model).hooks.activate(steering, prompt_length=inputs["input_ids"].shape[1], batch_size=1):
        expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, logits_processor=[prefix])
    unsteered = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, logits_processor=[prefix])
    assert not torch.equal(expected, unsteered)  # the steering matters ...
    assert_same_tokens(out.sequences, expected)  # ... and it acted in every sentence


def test_growing_cache_layers_match_dynamic_ones_through_crops_selects_and_repeats():
    from transformers import DynamicCache

    from vlm_safety_plugins.defenses.eta.best_of_n import GrowingLayer, recording_cache

    model, _ = testing.tiny_vlm("llava")
    growing, plain = recording_cache(model.config), DynamicCache(config=model.config)
    assert all(type(layer) is GrowingLayer for layer in growing.layers)
    torch.manual_seed(0)

    def update(length, batch):  # every layer, as a forward does (transformers < 5.20 cannot crop an empty layer)
        for index in range(len(plain.layers)):
            states = torch.randn(batch, 2, length, 16), torch.randn(batch, 2, length, 16)
            returned = [cache.update(*states, index) for cache in (growing, plain)]
            for mine, theirs in zip(returned[0], returned[1]):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
            torch.testing.assert_close(growing.layers[index].keys, plain.layers[index].keys, rtol=0, atol=0)
            torch.testing.assert_close(growing.layers[index].values, plain.layers[index].values, rtol=0, atol=0)

    update(70, 1)  # a prompt
    for _ in range(80):  # decoding past the spare room
        update(1, 1)
    steps = [
        lambda c: c.crop(-5),
        lambda c: c.batch_repeat_interleave(3),
        lambda c: c.crop(-2),
        lambda c: c.batch_select_indices(torch.tensor([2])),
    ]
    for step in steps:
        step(growing)
        step(plain)
        update(1, growing.layers[0].keys.shape[0])
    assert growing.get_seq_length() == plain.get_seq_length() == 70 + 80 + len(steps) - 7


def test_keep_row_keeps_one_row_cropped_and_refuses_a_length_past_the_cache(family):
    from vlm_safety_plugins.defenses.eta.best_of_n import GrowingLayer, keep_row

    model, processor = testing.tiny_vlm(family)
    adapter = find_adapter(model, processor)
    inputs = adapter.build_inputs([("What is in the picture?", testing.tiny_image()), ("Describe a cat.", None)])
    cache = prefill_cache(model.generate, model.config, inputs)
    length = inputs["input_ids"].shape[1] - 1
    assert cache.get_seq_length() == length
    with pytest.raises(ValueError, match=f"cannot keep {length + 1} positions of a cache holding {length}"):
        keep_row(cache, 1, length=length + 1)  # (transformers < 5.20 would crop to a positive length silently)
    full = [
        (index, layer.keys[1:2, :, : length - 3].clone())
        for index, layer in enumerate(cache.layers)
        if type(layer) is GrowingLayer
    ]
    keep_row(cache, 1, length=length - 3)
    assert cache.get_seq_length() == length - 3 and full
    assert all(layer.keys.shape[0] == 1 for layer in cache.layers)
    for index, keys in full:
        torch.testing.assert_close(cache.layers[index].keys, keys, rtol=0, atol=0)


def test_eta_turns_the_testbeds_image_induced_compliance_into_a_refusal():
    from vlm_safety_plugins import testbed
    from vlm_safety_plugins.testbed import world

    model, processor = testbed.load_vlm()
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    samples = world.samples(60, "test", seed=0)
    harmful = next(s for s in samples if s.kind == "harmful" and s.image_kind == "concept")
    benign = next(s for s in samples if s.kind == "question")
    inputs = adapter.build_inputs([(harmful.text, harmful.image), (benign.text, benign.image)])
    config = vsp.load_config("configs/eta-testbed.yaml")
    gen = config.to_generation_config(model.generation_config, max_new_tokens=40, return_dict_in_generate=True)
    out = model.generate(**inputs, images=[harmful.image, benign.image], generation_config=gen)
    plain = model.generate(**inputs, max_new_tokens=40)
    answers = adapter.tokenizer.batch_decode(new_tokens(out.sequences, inputs), skip_special_tokens=True)
    vanilla = adapter.tokenizer.batch_decode(new_tokens(plain, inputs), skip_special_tokens=True)
    assert vanilla[0].startswith("Sure") and answers[0].startswith(PREFIX) and "cannot help" in answers[0]
    assert out.safety[0].defenses["eta"].details["aligned"]
    assert answers[1] == vanilla[1] == benign.answer  # the benign scene passes the CLIP pre-check untouched
    assert not out.safety[1].defenses["eta"].details["pre_unsafe"]


# -- generate's own settings --------------------------------------------------------------------


@pytest.mark.parametrize("alignment", ["full", "shallow_only"])
def test_eta_aligns_under_beam_search(attached, alignment):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image), ("Hello there.", image)])
    out = run(model, inputs, eta(alignment=alignment), [image, image], num_beams=2)
    assert [report.refused for report in out.safety] == [False, False], out.safety[0].error
    assert all(report.defenses["eta"].details["aligned"] for report in out.safety)
    prefix = adapter.response_ids(PREFIX)
    for row in new_tokens(out.sequences, inputs).tolist():
        assert row[: len(prefix)] == prefix and len(row) <= MAX_NEW_TOKENS


def test_eta_honours_max_new_tokens_and_max_length_given_to_generate(attached):
    model, adapter, image = attached
    inputs = batch(model, adapter.processor, [("What is in the picture?", image)])
    gen = eta(alignment="shallow_only").to_generation_config(model.generation_config, return_dict_in_generate=True)
    out = model.generate(**inputs, images=[image], generation_config=gen, max_new_tokens=7)
    assert out.safety[0].defenses["eta"].details["aligned"] and new_tokens(out.sequences, inputs).shape[1] == 7
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, images=[image], generation_config=gen, max_length=prompt + 9)
    assert new_tokens(out.sequences, inputs).shape[1] == 9
