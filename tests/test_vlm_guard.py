"""VLM-Guard: project out / gated amplify of the safety subspace, exact vanilla when off."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import vlm_safety_plugins as vsp
from vlm_safety_plugins import testbed
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.defenses.vlm_guard.anchors import vlm_guard_pairs
from vlm_safety_plugins.defenses.vlm_guard.artifact import SafetySubspace
from vlm_safety_plugins.defenses.vlm_guard.calibration import best_threshold, calibrate_vlm_guard
from vlm_safety_plugins.steering.readout import last_prompt_states
from vlm_safety_plugins.testing import tiny_vlm

from .conftest import assert_same_tokens, batch, capture, generation

REQUESTS = [("How to steal a car?", None), ("What is in the picture?", "image")]


def guard(subspace, **options):
    """A VLM-Guard config in the setting these tests were written for (gated_amplify, text-only
    rows steered too) unless ``options`` say otherwise."""
    options = {"mode": "gated_amplify", "text_only": True, **options}
    return {"defenses": {"vlm_guard": {"subspace": str(subspace), **options}}, "on_error": "raise"}


def test_the_default_is_the_papers_projection_on_image_rows():
    options = vsp.load_config({"defenses": {"vlm_guard": {"subspace": "a.safetensors"}}}).defenses["vlm_guard"]
    assert options.mode == "project_out" and options.text_only is False


def test_by_default_text_only_rows_are_left_to_the_backbone(vlm, red_image, calibrated, family):
    model, processor = vlm
    path = calibrated(family)[1]
    vsp.attach(model, processor)
    inputs = batch(model, processor, requests(red_image))
    config = {"defenses": {"vlm_guard": {"subspace": str(path)}}, "on_error": "raise"}
    out = run(model, inputs, config, red_image, max_new_tokens=4)
    assert [report.defenses["vlm_guard"].ran for report in out.safety] == [False, True]  # rows: text, image


def requests(image):
    return [(text, image if kind else None) for text, kind in REQUESTS]


def run(model, inputs, config, image, **settings):
    return model.generate(
        **inputs,
        images=[None, image],
        return_dict_in_generate=True,
        generation_config=generation(model, config, do_sample=False, **settings),
    )


def test_project_out_leaves_no_component_in_the_subspace(vlm, family, red_image, calibrated):
    model, processor = vlm
    vsp.attach(model, processor)
    path = calibrated(family)[1]
    artifact = SafetySubspace.load(path)
    inputs = batch(model, processor, requests(red_image))
    layers = vsp.get_attachment(model).adapter.decoder_layers()
    with capture(layers) as outputs:
        out = run(model, inputs, guard(path, mode="project_out", rank=3), red_image, max_new_tokens=3)
    assert artifact.default_layers == [1, 2]  # the middle band of 4 layers
    for layer in (1, 2):
        basis = artifact.bases[layer][:3]
        prefill, *steps = outputs[layer]
        states = torch.cat([prefill[:, -1:], *steps], dim=1)  # last prompt token and each generated one
        assert (states @ basis.T).abs().max() < 1e-4
        assert (prefill[:, :-1] @ basis.T).abs().max() > 1e-2  # earlier prompt positions: left alone
    assert [report.defenses["vlm_guard"].decision for report in out.safety] == ["modified", "modified"]
    assert out.safety[0].defenses["vlm_guard"].details["rank"] == 3


def test_closed_gate_and_zero_alpha_are_exactly_vanilla(vlm, family, red_image, calibrated):
    model, processor = vlm
    inputs = batch(model, processor, requests(red_image))
    vanilla = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    vsp.attach(model, processor)
    path = calibrated(family)[1]
    closed = run(model, inputs, guard(path, tau=1e9, alpha=4.0), red_image, max_new_tokens=6)
    assert_same_tokens(closed.sequences, vanilla)
    records = [report.defenses["vlm_guard"] for report in closed.safety]
    assert [record.details["gate_fired"] for record in records] == [False, False]
    assert all(record.decision == "pass" and record.scores["projection"] < 1e9 for record in records)
    assert_same_tokens(run(model, inputs, guard(path, alpha=0.0), red_image, max_new_tokens=6).sequences, vanilla)
    opened = run(model, inputs, guard(path, tau=-1e9, alpha=4.0), red_image, max_new_tokens=6)
    assert not torch.equal(opened.sequences, vanilla)
    assert [report.defenses["vlm_guard"].details["gate_fired"] for report in opened.safety] == [True, True]


def test_gate_uses_the_calibrated_tau_and_reports_the_projection(red_image, calibrated):
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    path = calibrated("llava")[1]
    artifact = SafetySubspace.load(path)
    inputs = batch(model, processor, requests(red_image))
    states = last_prompt_states(model, adapter, inputs, [1])[1]
    expected = states @ artifact.bases[1][0]
    out = run(model, inputs, guard(path, alpha=2.0), red_image, max_new_tokens=2)
    for row, report in enumerate(out.safety):
        record = report.defenses["vlm_guard"]
        assert record.details["tau"] == artifact.thresholds[1] and record.details["gate_layer"] == 1
        assert record.scores["projection"] == pytest.approx(float(expected[row]), abs=1e-4)
        assert record.details["gate_fired"] == (float(expected[row]) > artifact.thresholds[1])


def test_tau_shift_moves_the_gate_in_anchor_gaps_and_needs_the_artifact_to_record_them(red_image, calibrated, tmp_path):
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    path = calibrated("llava")[1]
    artifact = SafetySubspace.load(path)
    gap = artifact.orientation["per_layer"]["1"]["gate_gap"]
    inputs = batch(model, processor, requests(red_image))
    plain = run(model, inputs, guard(path, alpha=2.0), red_image, max_new_tokens=2).safety
    projections = [report.defenses["vlm_guard"].scores["projection"] for report in plain]
    # a shift that puts τ just above the lower projection: that row's gate closes, the other's opens
    shift = (min(projections) - artifact.thresholds[1]) / gap + 1e-3
    out = run(model, inputs, guard(path, alpha=2.0, tau_shift=shift), red_image, max_new_tokens=2)
    tau = artifact.thresholds[1] + shift * gap
    for report, projection in zip(out.safety, projections, strict=True):
        record = report.defenses["vlm_guard"]
        assert record.details["tau"] == pytest.approx(tau)
        assert record.details["gate_fired"] == (projection > tau)
    assert sorted(report.defenses["vlm_guard"].details["gate_fired"] for report in out.safety) == [False, True]
    del artifact.orientation["per_layer"]["1"]["gate_gap"]  # an artifact from before the gap was recorded
    old = artifact.save(tmp_path / "old.safetensors")
    with pytest.raises(vsp.ArtifactError, match="tau_shift needs the anchor gap of layer 1"):
        run(model, inputs, guard(old, tau_shift=-0.5), red_image, max_new_tokens=2)
    run(model, inputs, guard(old, tau=0.0), red_image, max_new_tokens=2)  # without a shift it is fine


def test_both_modes_replace_the_subspace_part_with_the_amplified_prompt_part(red_image, calibrated):
    model, processor = tiny_vlm("qwen2_vl")
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    path = calibrated("qwen2_vl")[1]
    basis = SafetySubspace.load(path).bases[1]
    inputs = batch(model, processor, requests(red_image))
    prompt = last_prompt_states(model, adapter, inputs, [1])[1]
    with capture(adapter.decoder_layers()) as outputs:
        run(model, inputs, guard(path, mode="both", alpha=2.0, tau=-1e9, layers=[1]), red_image, max_new_tokens=3)
    for state in (outputs[1][0][:, -1], outputs[1][1][:, 0]):  # last prompt token, first generated token
        torch.testing.assert_close(state @ basis.T, 2.0 * prompt @ basis.T, atol=1e-3, rtol=1e-3)


def test_text_only_false_steers_image_rows_only(red_image, calibrated):
    model, processor = tiny_vlm("gemma3")
    inputs = batch(model, processor, requests(red_image))
    vanilla = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    vsp.attach(model, processor)
    out = run(
        model,
        inputs,
        guard(calibrated("gemma3")[1], mode="both", tau=-1e9, alpha=4.0, text_only=False),
        red_image,
        max_new_tokens=6,
    )
    assert_same_tokens(out.sequences[0], vanilla[0])
    assert not torch.equal(out.sequences[1], vanilla[1])
    assert [report.defenses["vlm_guard"].ran for report in out.safety] == [False, True]


def test_vlm_guard_through_peft(red_image, calibrated):
    model, processor = tiny_vlm("llava")
    torch.manual_seed(0)  # the LoRA weights are random
    wrapped = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    inputs = batch(model, processor, requests(red_image))
    vanilla = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
    vsp.attach(wrapped, processor)
    path = calibrated("llava")[1]
    assert_same_tokens(run(wrapped, inputs, guard(path, tau=1e9), red_image, max_new_tokens=5).sequences, vanilla)
    out = run(wrapped, inputs, guard(path, mode="both", tau=-1e9, alpha=3.0), red_image, max_new_tokens=5)
    assert not torch.equal(out.sequences, vanilla)
    assert all(report.defenses["vlm_guard"].details["gate_fired"] for report in out.safety)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"rank": 9}, "defenses.vlm_guard.rank is 9, but the artifact has rank 5"),
        ({"layers": [0, 7]}, "defenses.vlm_guard.layers [7] are not in the artifact"),
        ({"gate_layer": 6}, "defenses.vlm_guard.gate_layer [6] are not in the artifact"),
    ],
)
def test_options_that_do_not_fit_the_artifact_name_file_and_option(red_image, calibrated, options, fragment):
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    path = str(calibrated("llava")[1])
    with pytest.raises(vsp.ArtifactError) as caught:
        model.generate(
            **batch(model, processor, requests(red_image)),
            generation_config=generation(model, guard(path, **options), max_new_tokens=2),
        )
    assert str(caught.value).startswith(path) and fragment in str(caught.value)


@pytest.mark.parametrize(
    "options, path, fragment",
    [
        ({}, "defenses.vlm_guard.subspace", "required key is missing"),
        ({"subspace": "a.safetensors", "mode": "amplify"}, "defenses.vlm_guard.mode", "expected one of"),
        ({"subspace": "a.safetensors", "rank": 0}, "defenses.vlm_guard.rank", "out of range"),
        ({"subspace": "a.safetensors", "tau": "high"}, "defenses.vlm_guard.tau", "got str 'high'"),
        ({"subspace": "a.safetensors", "layers": []}, "defenses.vlm_guard.layers", "expected at least 1 item, got 0"),
    ],
)
def test_config_errors_name_the_key(options, path, fragment):
    with pytest.raises(vsp.ConfigError) as caught:
        vsp.load_config({"defenses": {"vlm_guard": options}})
    assert caught.value.path == path and fragment in str(caught.value)


def test_an_image_conditioned_tau_separates_the_pairs_asked_with_a_corrupted_image(tmp_path):
    """``tau_from="image"`` keeps the text-taught subspace and moves only τ: to the best cut between the
    harmful and harmless pairs' projections when each is asked beside a corrupted (content-free) image."""
    model, processor = testbed.load_vlm()
    pairs = vlm_guard_pairs("builtin:testbed_vlm_guard_pairs.jsonl")[0][:24]
    text = calibrate_vlm_guard(model, processor, pairs, rank=2, batch_size=len(pairs))
    image = calibrate_vlm_guard(model, processor, pairs, rank=2, tau_from="image", batch_size=len(pairs))
    adapter = find_adapter(model, processor)
    corrupted = adapter.corrupted_image("blank", size=adapter.image_size())
    requests = [(bad, corrupted) for bad, _ in pairs] + [(good, corrupted) for _, good in pairs]
    layers = sorted(image.bases)
    states = last_prompt_states(model, adapter, adapter.build_inputs(requests), layers)
    for layer in layers:
        torch.testing.assert_close(image.bases[layer], text.bases[layer])
        direction = image.bases[layer][0].double()
        projections = states[layer].double() @ direction
        expected, _ = best_threshold(projections[: len(pairs)], projections[len(pairs) :])
        assert image.thresholds[layer] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        gaps = image.orientation["per_layer"][str(layer)]
        assert gaps["gate_gap"] == pytest.approx(
            float(projections[: len(pairs)].mean() - projections[len(pairs) :].mean()), rel=1e-4
        )
        assert text.orientation["per_layer"][str(layer)]["gate_gap"] == pytest.approx(
            text.orientation["per_layer"][str(layer)]["mean_gap"]
        )
    assert any(image.thresholds[layer] != pytest.approx(text.thresholds[layer], rel=1e-3) for layer in layers)
    reloaded = SafetySubspace.load(image.save(tmp_path / "guard.safetensors"))
    assert reloaded.tau_from == "image" and reloaded.thresholds == pytest.approx(image.thresholds)
