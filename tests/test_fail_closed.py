"""Ways around the defenses that must stay closed: non-finite options, remote code from flags,
tokens streamed before a veto, failures inside the inner generate (issue 11's findings)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria, StoppingCriteriaList

import vlm_safety_plugins as vsp
from vlm_safety_plugins.cli import cli
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.core.options import INT_LIMIT
from vlm_safety_plugins.core.reference import option_rows

from .conftest import batch, generation, new_tokens
from .test_runtime import CollectingStreamer

# The least each built-in defense needs to get past its required keys (artifacts load later).
BASE_OPTIONS = {"cmrm": {"vectors": "unused.safetensors"}, "vlm_guard": {"subspace": "unused.safetensors"}}


def numeric_options():
    """(defense, dotted key path, type) of every float and int option of every built-in defense."""
    for item in sorted(plugins.registry().defenses.values(), key=lambda item: item.name):
        if item.distribution != "vlm-safety-plugins":
            continue
        for path, row in option_rows(item.cls.Options):
            kinds = set(row["type"].split(" | "))
            for kind in ("float", "int") if kinds & {"float", "int"} else ():
                if kind in kinds:
                    yield item.name, path, kind


def with_value(name, path, value):
    options = json.loads(json.dumps(BASE_OPTIONS.get(name, {})))
    *parents, key = path.split(".")
    target = options
    for parent in parents:
        target = target.setdefault(parent, {})
    target[key] = value
    return {"defenses": {name: options}}


@pytest.mark.parametrize("name, path, kind", list(numeric_options()))
def test_every_numeric_option_rejects_nan_infinity_and_huge_values(name, path, kind):
    bad = [math.nan, math.inf, -math.inf, "1e999", "-1e999", 10**400] if kind == "float" else [10**30, -(10**30)]
    for value in bad:
        with pytest.raises(vsp.ConfigError) as caught:
            vsp.SafetyConfig.from_dict(with_value(name, path, value))
        assert caught.value.path.endswith(path), (path, value, caught.value)
        assert len(str(caught.value)) < 400  # the value is quoted, cut short
    if kind == "int":
        with pytest.raises(vsp.ConfigError, match="too large|out of range"):
            vsp.SafetyConfig.from_dict(with_value(name, path, INT_LIMIT + 1))


def test_a_nan_threshold_is_refused_before_the_model_loads(tmp_path):
    config = tmp_path / "nan.yaml"
    config.write_text(
        "defenses:\n  eta:\n    pre_threshold: .nan\n    clip: {model: testbed-clip}\n"
        "    reward_model: {path: testbed-reward-model}\n"
    )
    result = CliRunner().invoke(
        cli, ["generate", "--model", "no-such-model-is-loaded", "--config", str(config), "--prompt", "Hi."]
    )
    assert result.exit_code == 1 and "defenses.eta.pre_threshold: expected a finite number, got nan" in result.output


# -- remote code: the operator's decision, never a flag's -----------------------------------


def reward_model_folder(tmp_path):
    """A reward-model folder whose config asks for its own modeling code, which leaves a marker when run."""
    from vlm_safety_plugins.testing import tiny_reward_model

    folder, marker = tmp_path / "rm", tmp_path / "remote-code-ran"
    model, tokenizer = tiny_reward_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "raise ImportError('this checkpoint ran its own code')\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def eta_asking_for_remote_code(folder):
    return {
        "defenses": {
            "eta": {
                "pre_threshold": -1.0,
                "post_threshold": 1e3,
                "clip": {"model": "tiny-clip"},
                "reward_model": {"path": str(folder), "trust_remote_code": True},
            }
        }
    }


def test_remote_code_is_off_by_default():
    assert vsp.load_config({"defenses": {"eta": {}}}).defenses["eta"].reward_model.trust_remote_code is False


def test_flags_in_a_model_folder_cannot_turn_remote_code_on(llava, red_image, tmp_path):
    model, processor = llava
    folder, marker = reward_model_folder(tmp_path)
    model.generation_config.vlm_safety = eta_asking_for_remote_code(folder)  # as a downloaded checkpoint's flags
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    out = model.generate(**inputs, images=[red_image], max_new_tokens=4, return_dict_in_generate=True)
    assert out.safety[0].refused and "has not allowed" in out.safety[0].error
    assert not marker.exists()
    vsp.detach(model)
    # the operator's explicit permission is what lets it run (and here the code itself fails, closed)
    vsp.attach(model, processor, trust_remote_code=True)
    out = model.generate(**inputs, images=[red_image], max_new_tokens=4, return_dict_in_generate=True)
    assert marker.exists() and out.safety[0].refused


@pytest.fixture
def llava():
    from vlm_safety_plugins.testing import tiny_vlm

    model, processor = tiny_vlm("llava")
    yield model, processor
    vsp.detach(model)


# -- streaming: nothing goes out before every around-generate defense has cleared it ----------


class ProceedThenRaise(vsp.Defense):
    """Generates with the caller's streamer, then vetoes by failing."""

    name = "proceed_then_raise"

    def around_generate(self, call, proceed):
        proceed()
        raise RuntimeError("vetoed after generating")


class HoldsUntilDecided(vsp.Defense):
    """Generates, then decides; never passes the stream, so everything goes out at the end."""

    name = "holds_until_decided"
    decided = False

    def around_generate(self, call, proceed):
        type(self).decided = False
        output = proceed()
        type(self).decided = True
        return output


class RaiseAtStep(LogitsProcessor):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.step:
            raise RuntimeError(f"processor failed at step {self.step}")
        return scores


class FailsMidDecoding(vsp.Defense):
    name = "fails_mid_decoding"

    def logits_processors(self, call):
        return [RaiseAtStep(3)]


def stream(model, processor, image, flags, **settings):
    inputs = batch(model, processor, [("What is in the picture?", image)])
    streamer = CollectingStreamer()
    config = generation(model, flags, max_new_tokens=6, do_sample=False, **settings)
    out = model.generate(**inputs, generation_config=config, streamer=streamer, return_dict_in_generate=True)
    return out, inputs, streamer


def test_a_veto_after_generating_streams_only_the_refusal(llava, red_image, register):
    model, processor = llava
    register(ProceedThenRaise)
    vsp.attach(model, processor)
    out, inputs, streamer = stream(model, processor, red_image, {"defenses": {"proceed_then_raise": {}}})
    refusal = processor.tokenizer.decode(new_tokens(out.sequences, inputs)[0], skip_special_tokens=True)
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist() and len(streamer.chunks) == 2
    assert processor.tokenizer.decode(streamer.chunks[1], skip_special_tokens=True) == refusal
    assert streamer.ended and out.safety[0].refused and out.safety[0].streamed_tokens == 0


def test_an_around_generate_defense_holds_the_stream_until_it_returns(llava, red_image, register):
    model, processor = llava
    register(HoldsUntilDecided)
    vsp.attach(model, processor)
    seen_decided = []
    streamer = CollectingStreamer()
    streamer.put = lambda value: (
        seen_decided.append(HoldsUntilDecided.decided),
        CollectingStreamer.put(streamer, value),
    )
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, {"defenses": {"holds_until_decided": {}}}, max_new_tokens=5)
    out = model.generate(**inputs, generation_config=config, streamer=streamer, return_dict_in_generate=True)
    assert seen_decided and all(seen_decided), "a token went out before the defense had decided"
    assert [t for chunk in streamer.chunks[1:] for t in chunk] == new_tokens(out.sequences, inputs)[0].tolist()


def test_a_failure_mid_decoding_ends_the_stream_with_the_refusal_and_counts_what_went_out(llava, red_image, register):
    model, processor = llava
    register(FailsMidDecoding)
    vsp.attach(model, processor)
    out, inputs, streamer = stream(model, processor, red_image, {"defenses": {"fails_mid_decoding": {}}})
    report = out.safety[0]
    assert report.refused and report.error.startswith("fails_mid_decoding: RuntimeError: processor failed at step 3")
    assert report.streamed_tokens == 3 and sum(map(len, streamer.chunks[1:4])) == 3
    refusal = new_tokens(out.sequences, inputs)[0].tolist()
    assert streamer.chunks[-1] == refusal and streamer.ended


class HangsUp(CollectingStreamer):
    """A server's streamer whose client left: it raises on the third put, as transformers serve's does."""

    class ClientGone(Exception):
        pass

    def put(self, value):
        if len(self.chunks) == 2:
            raise self.ClientGone
        super().put(value)


class CancelAtStep(StoppingCriteria):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls > self.step:
            raise vsp.core.errors.GenerationCancelled
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


ETA_ALIGNS = {  # every row judged unsafe and aligned, the aligned answer streamed
    "clip": {"model": "tiny-clip"},
    "reward_model": {"path": "tiny-reward-model"},
    "pre_threshold": -1.0,
    "post_threshold": 1e9,
    "alignment": "shallow_only",
}


@pytest.mark.parametrize(
    "flags", [{"defenses": {"adashield": {}}}, {"defenses": {"eta": ETA_ALIGNS}}], ids=["adashield", "eta"]
)
def test_a_cancelled_stream_aborts_the_call_and_is_never_read_as_a_refusal(llava, red_image, register, flags):
    model, processor = llava
    reports = []
    register(report_sink=reports)
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, flags, max_new_tokens=8)
    with pytest.raises(HangsUp.ClientGone):  # the caller's own exception, unchanged
        model.generate(**inputs, generation_config=config, streamer=HangsUp())
    with pytest.raises(vsp.core.errors.GenerationCancelled):
        model.generate(**inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([CancelAtStep(2)]))
    assert reports == []  # no report: nothing was answered, nothing refused


class CountSteps(LogitsProcessor):
    steps = 0

    def __call__(self, input_ids, scores):
        type(self).steps += 1
        return scores


def test_eta_streams_a_safe_answer_live(llava, red_image):
    model, processor = llava
    vsp.attach(model, processor)
    flags = {"defenses": {"eta": {"pre_threshold": 1.0, "clip": {"model": "tiny-clip"}}}}
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    steps_at_put = []
    streamer = CollectingStreamer()
    streamer.put = lambda value: (steps_at_put.append(CountSteps.steps), CollectingStreamer.put(streamer, value))
    CountSteps.steps = 0
    config = generation(model, flags, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True)
    out = model.generate(
        **inputs, images=[red_image], generation_config=config, streamer=streamer, logits_processor=[CountSteps()]
    )
    assert not out.safety[0].defenses["eta"].details["pre_unsafe"]
    assert steps_at_put == [0, 1, 2, 3, 4, 5]  # the prompt, then each token as soon as it is decoded


# -- failures inside the inner generate ------------------------------------------------------


class Overflows(vsp.Defense):
    """Adds a vector so large that the hidden states overflow to infinity."""

    name = "overflows"

    def interventions(self, call):
        size = call.adapter.hidden_size()
        return [vsp.AddVector({0: torch.full((size,), 3e38)}, alpha=10.0)]


def test_an_edit_that_overflows_during_sampling_fails_closed(llava, red_image, register):
    model, processor = llava
    register(Overflows)
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, {"defenses": {"overflows": {}}}, max_new_tokens=3, do_sample=True)
    out = model.generate(**inputs, generation_config=config, return_dict_in_generate=True)
    assert out.safety[0].refused and out.safety[0].error.startswith("overflows: RuntimeError")
    with pytest.raises(RuntimeError):
        raising = GenerationConfig(
            **{**config.to_dict(), "vlm_safety": {"defenses": {"overflows": {}}, "on_error": "raise"}}
        )
        model.generate(**inputs, generation_config=raising)


# -- bad input at the command line: one clear error, no traceback ------------------------------


@pytest.fixture(scope="module")
def hostile_images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    Image.new("1", (15000, 15000)).save(folder / "bomb.png")  # 225 megapixels, beyond PIL's bomb limit
    Image.new("RGB", (1, 20000)).save(folder / "thin.png")
    return folder


def test_a_decompression_bomb_is_refused_by_generate_and_eval(hostile_images, tmp_path):
    bomb = hostile_images / "bomb.png"
    result = CliRunner().invoke(cli, ["generate", "--image", str(bomb), "--prompt", "Hi."])
    assert result.exit_code == 2 and "decompression bomb" in result.output and "Traceback" not in result.output
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "a", "prompt": "Hi.", "image": str(bomb), "label": "benign"}) + "\n")
    result = CliRunner().invoke(
        cli, ["eval", "--benchmark", str(samples), "--model", "tiny-llava", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 1 and "decompression bomb" in result.output, result.output


def test_an_image_the_processor_cannot_take_is_a_clear_error(hostile_images):
    result = CliRunner().invoke(
        cli, ["generate", "--model", "tiny-qwen2-vl", "--image", str(hostile_images / "thin.png"), "--prompt", "Hi."]
    )
    assert result.exit_code == 1 and "the processor refused the request: absolute aspect ratio" in result.output


@pytest.mark.parametrize(
    "family, token", [("llava", "<image>"), ("qwen2_vl", "<|im_end|>"), ("gemma3", "<start_of_image>")]
)
def test_special_tokens_in_user_text_are_refused(family, token):
    from vlm_safety_plugins.core.adapters import find_adapter
    from vlm_safety_plugins.testing import tiny_image, tiny_vlm

    adapter = find_adapter(*tiny_vlm(family))
    with pytest.raises(vsp.AdapterError, match="row 1: the user text contains the model's special token"):
        adapter.build_inputs([("Fine.", tiny_image()), (f"look {token} here", None)])
    result = CliRunner().invoke(
        cli, ["generate", "--model", f"tiny-{family.replace('_', '-')}", "--prompt", f"a {token}"]
    )
    assert result.exit_code == 1 and "special token" in result.output


def test_two_eval_runs_cannot_write_one_folder(tmp_path):
    from vlm_safety_plugins.evaluation.responses import ResponseLog
    from vlm_safety_plugins.evaluation.samples import EvaluationError

    first, second = ResponseLog(tmp_path), ResponseLog(tmp_path)
    first.bind({"model": "m"})
    with pytest.raises(EvaluationError, match="another vlm-safety eval is writing this folder"):
        second.bind({"model": "m"})
    first.release()
    second.bind({"model": "m"})  # free again once the first run is done
    second.release()


# -- a model whose generate is already replaced (transformers' custom_generate) ------------------


def test_attach_keeps_a_custom_generate_and_detach_restores_it(llava, red_image):
    import functools

    from transformers.generation.utils import GenerationMixin

    model, processor = llava
    seen = []

    def custom_generate(model, **kwargs):  # as transformers installs one: functools.partial(custom, model=model)
        seen.append(kwargs["input_ids"].shape[1])
        return GenerationMixin.generate(model, **kwargs)

    custom = functools.partial(custom_generate, model=model)
    model.generate = custom
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, {"defenses": {"adashield": {}}}, max_new_tokens=2, return_dict_in_generate=True)
    out = model.generate(**inputs, generation_config=config)
    assert out.safety[0].decision == "modified" and len(seen) == 1
    assert seen[0] > inputs["input_ids"].shape[1]  # the custom generate ran, on the defended prompt
    vsp.detach(model)
    assert model.generate is custom


def test_a_generate_nested_in_a_defended_call_is_plain_and_does_not_apply_the_defenses_twice(llava, red_image):
    from transformers.generation.utils import GenerationMixin

    model, processor = llava
    entries = []

    def delegating_generate(**kwargs):  # a custom generate that decodes with model.generate
        entries.append(kwargs["input_ids"].shape[1])
        if len(entries) > 1:  # (without the guard, the nested call comes back here, defended again)
            return GenerationMixin.generate(model, **kwargs)
        return model.generate(**kwargs)

    model.generate = delegating_generate
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, {"defenses": {"adashield": {}}}, max_new_tokens=2, return_dict_in_generate=True)
    prompt_lengths = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: prompt_lengths.append(k["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        out = model.generate(**inputs, generation_config=config)
    finally:
        hook.remove()
    assert len(entries) == 1 and out.safety[0].decision == "modified"
    assert prompt_lengths[0] == entries[0]  # the AdaShield prompt went in once
