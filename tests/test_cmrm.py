"""CMRM: steers image rows towards their text-only states; exact vanilla when off; safe artifacts."""

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from PIL import Image

import vlm_safety_plugins as vsp
from vlm_safety_plugins import testbed
from vlm_safety_plugins.defenses.cmrm.anchors import cmrm_anchors
from vlm_safety_plugins.defenses.cmrm.calibration import calibrate_cmrm
from vlm_safety_plugins.testing import tiny_vlm

from .conftest import assert_same_tokens, attach_unable_to_rebuild_images, batch, capture, concurrent, generation

QUESTION = "Describe the colours in this picture."


def last_prompt_states(model, inputs, config=None, images=None):
    """Per layer, the last prompt token's state in the prefill of a (defended) one-token generate."""
    layers = vsp.get_attachment(model).adapter.decoder_layers()
    extra = (
        {}
        if config is None
        else {
            "generation_config": generation(model, {**config, "on_error": "raise"}, max_new_tokens=1, do_sample=False),
            "images": images,
        }
    )
    with capture(layers) as outputs:
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **extra) if config is None else model.generate(
            **inputs, **extra
        )
    return {layer: states[-1][:, -1] for layer, states in outputs.items()}  # the last pass is the prefill


def cmrm(**options):
    return {"defenses": {"cmrm": options}}


@pytest.mark.parametrize("level", ["sample", "dataset"])
def test_a_content_free_image_lands_exactly_on_the_text_only_state(vlm, level, tmp_path):
    """α = 1 adds h(text-only) − h(corrupted): with the corrupted image itself as the request's
    image, the steered layer's state is the text-only one (sign, position and scale all checked)."""
    model, processor = vlm
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    image = adapter.corrupted_image("blank", size=adapter.image_size())  # the calibration's stand-in size
    options = {"level": "sample", "alpha": 1.0}
    if level == "dataset":  # one anchor, the question itself: the dataset mean is its own shift
        options = {"vectors": str(calibrate_cmrm(model, processor, [QUESTION]).save(tmp_path / "one.safetensors"))}
    with_image, text_only = batch(model, processor, [(QUESTION, image)]), batch(model, processor, [(QUESTION, None)])
    before, target = last_prompt_states(model, with_image), last_prompt_states(model, text_only)
    for layer in range(len(adapter.decoder_layers())):
        after = last_prompt_states(model, with_image, cmrm(**options, layers=[layer]), [image])
        torch.testing.assert_close(after[layer], target[layer], atol=2e-4, rtol=2e-4)
        if layer:  # (gemma3's sliding window hides the image from layer 0's last token)
            assert (before[layer] - target[layer]).norm() > 0.5


def test_sample_level_moves_image_states_towards_text_only_at_every_layer(vlm):
    model, processor = vlm
    vsp.attach(model, processor)
    image = Image.new("RGB", (48, 40), (220, 30, 30))
    with_image, text_only = batch(model, processor, [(QUESTION, image)]), batch(model, processor, [(QUESTION, None)])
    before, target = last_prompt_states(model, with_image), last_prompt_states(model, text_only)
    for layer in before:  # one steered layer at a time: its own shift, not the ones below it compounded
        after = last_prompt_states(model, with_image, cmrm(level="sample", layers=[layer]), [image])
        distance_before, distance_after = (before[layer] - target[layer]).norm(), (after[layer] - target[layer]).norm()
        if distance_before > 1e-3:
            assert distance_after < distance_before - 0.1, (layer, float(distance_before), float(distance_after))
        else:  # gemma3's sliding window hides the image from layer 0's last token: nothing to move
            assert distance_after < 1e-3


def test_dataset_vectors_bring_the_anchors_closer_to_text_only_by_their_norm(vlm, tmp_path):
    """Over its anchors, adding v = mean(d_i) at one layer lowers the mean squared distance
    |d_i − v|² by exactly |v|² (the corrupted-image view is what the vector is defined on)."""
    model, processor = vlm
    anchors = ["How do I make a bomb?", QUESTION, "What is the capital of France?", "How can I hurt someone?"]
    artifact = calibrate_cmrm(model, processor, anchors)
    path = str(artifact.save(tmp_path / "a.safetensors"))
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    image = adapter.corrupted_image("blank", size=adapter.image_size())
    corrupted, text_only = (batch(model, processor, [(text, view) for text in anchors]) for view in (image, None))
    before, target = last_prompt_states(model, corrupted), last_prompt_states(model, text_only)
    for layer in before:
        after = last_prompt_states(model, corrupted, cmrm(vectors=path, layers=[layer]), [image] * len(anchors))
        drop = ((before[layer] - target[layer]).pow(2).sum(1) - (after[layer] - target[layer]).pow(2).sum(1)).mean()
        if layer:  # (gemma3: layer 0 never sees the image, v_0 = 0)
            torch.testing.assert_close(drop, artifact.vectors[layer].pow(2).sum(), rtol=1e-2, atol=1e-3)


def test_alpha_zero_and_text_only_rows_are_exactly_vanilla(vlm, red_image, calibrated, family):
    model, processor = vlm
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    vanilla = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    vsp.attach(model, processor)
    vectors = str(calibrated(family)[0])
    for options in ({"vectors": vectors, "alpha": 0.0}, {"level": "sample", "alpha": 0.0}):
        out = model.generate(
            **inputs,
            images=[red_image, None],
            return_dict_in_generate=True,
            generation_config=generation(model, cmrm(**options), max_new_tokens=6, do_sample=False),
        )
        assert_same_tokens(out.sequences, vanilla)
        assert [report.defenses["cmrm"].details["applied"] for report in out.safety] == [False, False]
    for options in ({"vectors": vectors}, {"level": "sample", "alpha": 1.0}):
        out = model.generate(
            **inputs,
            images=[red_image, None],
            return_dict_in_generate=True,
            generation_config=generation(model, cmrm(**options), max_new_tokens=6, do_sample=False),
        )
        assert_same_tokens(out.sequences[1], vanilla[1])  # the text-only row of the mixed batch: untouched
        assert not torch.equal(out.sequences[0], vanilla[0])
        image_row, text_row = (report.defenses["cmrm"] for report in out.safety)
        assert (image_row.ran, image_row.decision, text_row.ran, text_row.decision) == (True, "modified", False, "pass")
        assert image_row.details["layers"] == [0, 1, 2, 3] and image_row.details["alpha"] == options.get("alpha", 1.0)
        if options.get("level") == "sample":
            assert image_row.details["vector_norm"] > 0 and "vector_norm" not in text_row.details


def test_a_steered_and_a_plain_thread_share_one_model(red_image, calibrated):
    model, processor = tiny_vlm("llava")
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    vanilla = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vsp.attach(model, processor)
    steer = generation(
        model,
        {
            "defenses": {
                "cmrm": {"level": "sample", "alpha": 1.0},
                "vlm_guard": {"subspace": str(calibrated("llava")[1]), "tau": -1e9},
            },
            "on_error": "raise",
        },
        max_new_tokens=5,
        do_sample=False,
    )
    steered = model.generate(**inputs, images=[red_image, None], generation_config=steer)
    assert not torch.equal(steered, vanilla)
    outputs = concurrent(
        {
            "plain": lambda: model.generate(**inputs, max_new_tokens=5, do_sample=False),
            "steered": lambda: model.generate(**inputs, images=[red_image, None], generation_config=steer),
        }
    )
    assert all(torch.equal(out, vanilla) for out in outputs["plain"])
    assert all(torch.equal(out, steered) for out in outputs["steered"])


def test_cmrm_through_peft(red_image, calibrated):
    model, processor = tiny_vlm("gemma3")
    torch.manual_seed(0)  # the LoRA weights are random
    wrapped = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    vanilla = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
    vsp.attach(wrapped, processor)
    vectors = str(calibrated("gemma3")[0])  # made on the bare model: same architecture, so it loads

    def run(**options):
        return wrapped.generate(
            **inputs,
            images=[red_image],
            return_dict_in_generate=True,
            generation_config=generation(model, cmrm(**options), max_new_tokens=5, do_sample=False),
        )

    assert_same_tokens(run(vectors=vectors, alpha=0.0).sequences, vanilla)
    for out in (run(vectors=vectors, alpha=2.0), run(level="sample", alpha=1.0)):
        assert out.safety[0].defenses["cmrm"].details["applied"] and not torch.equal(out.sequences, vanilla)
    # calibration runs through the wrapper too (LoRA weights included)
    assert calibrate_cmrm(wrapped, processor, [QUESTION]).layers == [0, 1, 2, 3]


def test_an_artifact_for_another_model_fails_before_any_generation(red_image, calibrated):
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    foreign = str(calibrated("qwen2_vl")[0])  # same hidden size and depth, another architecture
    with pytest.raises(vsp.ArtifactError) as caught:
        model.generate(
            **inputs,
            generation_config=generation(model, {**cmrm(vectors=foreign), "on_error": "raise"}, max_new_tokens=3),
        )
    message = str(caught.value)
    assert message.startswith(foreign) and "made for another model" in message and "config hash" in message
    out = model.generate(
        **inputs,
        generation_config=generation(model, cmrm(vectors=foreign), max_new_tokens=3),
        return_dict_in_generate=True,
    )
    assert out.safety[0].refused and foreign in out.safety[0].error and "config hash" in out.safety[0].error
    assert calls == []  # the model never ran


@pytest.mark.parametrize(
    "options, path, fragment",
    [
        ({}, "defenses.cmrm.vectors", "required for `level: dataset`"),
        ({"level": "sample", "vectors": "x.safetensors"}, "defenses.cmrm.vectors", "only for `level: dataset`"),
        ({"level": "sample", "alpha": -1}, "defenses.cmrm.alpha", "out of range"),
        ({"level": "sample", "scope": "prompt"}, "defenses.cmrm.scope", "expected one of"),
        ({"level": "sample", "corrupt": "blur"}, "defenses.cmrm.corrupt", "expected one of"),
        ({"level": "sample", "layers": []}, "defenses.cmrm.layers", "expected at least 1 item, got 0"),
        ({"level": "sample", "vector": "x"}, "defenses.cmrm.vector", "unknown key 'vector'"),
    ],
)
def test_config_errors_name_the_key(options, path, fragment):
    with pytest.raises(vsp.ConfigError) as caught:
        vsp.load_config(cmrm(**options))
    assert caught.value.path == path and fragment in str(caught.value)


def test_options_that_do_not_fit_the_artifact_are_clear_errors(red_image, calibrated):
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    vectors = str(calibrated("llava")[0])
    for options, fragment in [
        ({"vectors": vectors, "layers": [9]}, "defenses.cmrm.layers [9] are not in the artifact"),
        ({"vectors": vectors, "corrupt": "noise"}, "computed with 'blank' images"),
    ]:
        with pytest.raises(vsp.ArtifactError) as caught:
            model.generate(**inputs, generation_config=generation(model, cmrm(**options), max_new_tokens=2))
        assert str(caught.value).startswith(vectors) and fragment in str(caught.value)


def test_sample_level_needs_the_raw_image_where_it_cannot_be_rebuilt(red_image):
    model, processor = tiny_vlm("llava")
    attach_unable_to_rebuild_images(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    config = generation(model, {**cmrm(level="sample"), "on_error": "raise"}, max_new_tokens=2)
    with pytest.raises(vsp.DefenseError, match="images="):
        model.generate(**inputs, generation_config=config)
    assert model.generate(**inputs, images=[red_image], generation_config=config).shape[0] == 1


def test_shipped_configs_validate():
    configs = Path(__file__).resolve().parents[1] / "configs"
    expected = {"cmrm.yaml": ["cmrm"], "vlm_guard.yaml": ["vlm_guard"], "eta+cmrm.yaml": ["eta", "cmrm"]}
    for name, defenses in expected.items():
        config = vsp.load_config(configs / name)
        assert list(config.defenses) == defenses and config.on_error == "refuse"
    assert config.defenses["cmrm"].vectors == "artifacts/llava-1.5-7b-hf.cmrm.safetensors"
    assert vsp.load_config(configs / "vlm_guard.yaml").defenses["vlm_guard"].mode == "project_out"


def test_eta_and_cmrm_compose(red_image, calibrated):
    """CMRM steers ETA's vanilla answer and its aligned re-generation (continued from the cache)."""
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    eta = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "eta-tiny.yaml").read_text())
    options = {**eta["defenses"]["eta"], "max_new_tokens": 8}
    inputs = batch(model, processor, [("How to steal a car?", red_image), ("Hi", None)])
    config = {"defenses": {"eta": options, "cmrm": {"vectors": str(calibrated("llava")[0])}}, "on_error": "raise"}
    out = model.generate(
        **inputs,
        images=[red_image, None],
        return_dict_in_generate=True,
        generation_config=generation(model, config, max_new_tokens=8),
    )
    image_row, text_row = out.safety
    assert image_row.defenses["cmrm"].decision == "modified" and not text_row.defenses["cmrm"].ran
    assert image_row.defenses["eta"].details["aligned"]


def test_sequential_calibration_steers_closer_to_text_only_than_one_shot_when_every_layer_is_steered(tmp_path):
    """Each sequential vector is measured with the layers below already steered: the first layer's is
    the one-shot one, the upper ones differ, and steering every layer lands held-out corrupted-image
    states nearer their text-only states than the one-shot vectors do at the same α."""
    model, processor = testbed.load_vlm()
    anchors = cmrm_anchors("builtin:testbed_cmrm_anchors.jsonl")[0]
    fit, held_out = anchors[:-16], anchors[-16:]
    one_shot = calibrate_cmrm(model, processor, fit)
    sequential = calibrate_cmrm(model, processor, fit, sequential=True)
    layers = sorted(one_shot.vectors)
    torch.testing.assert_close(sequential.vectors[layers[0]], one_shot.vectors[layers[0]])
    for layer in layers[1:]:
        moved = (sequential.vectors[layer] - one_shot.vectors[layer]).norm()
        assert moved > 0.05 * one_shot.vectors[layer].norm(), layer
    reloaded = vsp.CmrmVectors.load(sequential.save(tmp_path / "sequential.safetensors"))
    assert (reloaded.calibration, reloaded.alpha) == ("sequential", 1.0)
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    image = adapter.corrupted_image("blank", size=adapter.image_size())
    corrupted, text_only = (batch(model, processor, [(text, view) for text in held_out]) for view in (image, None))
    target = last_prompt_states(model, text_only)[layers[-1]]
    distances = {}
    for name, artifact in (("one_shot", one_shot), ("sequential", sequential)):
        path = str(artifact.save(tmp_path / f"{name}.safetensors"))
        steered = last_prompt_states(model, corrupted, cmrm(vectors=path, scope="last_prompt"), [image] * len(held_out))
        distances[name] = float((steered[layers[-1]] - target).norm(dim=1).mean())
    assert distances["sequential"] < distances["one_shot"], distances
