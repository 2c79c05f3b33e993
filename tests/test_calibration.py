"""Calibration: last-token read-out, CMRM / VLM-Guard artifacts, their safety checks, the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vlm_safety_plugins as vsp
from vlm_safety_plugins.cli import cli
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.defenses.cmrm.anchors import cmrm_anchors
from vlm_safety_plugins.defenses.cmrm.artifact import CmrmVectors
from vlm_safety_plugins.defenses.cmrm.calibration import calibrate_cmrm
from vlm_safety_plugins.defenses.vlm_guard.anchors import vlm_guard_pairs
from vlm_safety_plugins.defenses.vlm_guard.artifact import SafetySubspace
from vlm_safety_plugins.defenses.vlm_guard.calibration import calibrate_vlm_guard, middle_layers
from vlm_safety_plugins.steering.artifacts import ModelIdentity
from vlm_safety_plugins.steering.readout import last_prompt_states
from vlm_safety_plugins.testing import tiny_image, tiny_vlm

from .conftest import batch

ANCHORS = ["How do I make a bomb?", "Describe the colours in this picture.", "What is the capital of France?"]
PAIRS = vlm_guard_pairs()[0][:8]


def hidden_states(model, inputs):
    """Every layer's output at the last position, from transformers' own output_hidden_states."""
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
    return [state[:, -1] for state in states[1:]]  # (the last entry is after the final norm)


def test_read_out_matches_transformers_hidden_states(vlm, red_image):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image), ("Describe a cat.", None)])
    read = last_prompt_states(model, adapter, inputs, [0, 1, 2])
    assert all(not layer._forward_hooks for layer in adapter.decoder_layers())  # its temporary hooks are gone
    expected = hidden_states(model, inputs)
    for layer in (0, 1, 2):
        torch.testing.assert_close(read[layer], expected[layer])


def test_cmrm_vectors_are_the_mean_text_only_minus_corrupted_shift(vlm, family):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    artifact = calibrate_cmrm(model, processor, ANCHORS, layers=[1, 2], batch_size=2)
    stand_in = adapter.corrupted_image("blank", size=adapter.image_size())
    shifts = []
    for text in ANCHORS:  # one anchor at a time, no padding, through transformers' hidden states
        corrupted = hidden_states(model, adapter.build_inputs([(text, stand_in)], image_mode="blank"))
        text_only = hidden_states(model, adapter.build_inputs([(text, None)]))
        shifts.append(torch.stack([text_only[layer][0] - corrupted[layer][0] for layer in (1, 2)]))
    expected = torch.stack(shifts).mean(dim=0)
    assert artifact.layers == [1, 2] and artifact.anchors == 3 and artifact.corruption == "blank"
    for index, layer in enumerate((1, 2)):
        torch.testing.assert_close(artifact.vectors[layer], expected[index], atol=1e-4, rtol=1e-4)
    assert artifact.model == ModelIdentity.of(adapter)
    assert set(artifact.orientation["moved_closer"]) == {"1", "2"}


def test_vlm_guard_orients_harmful_anchors_above_harmless_ones(vlm, family):
    model, processor = vlm
    adapter = find_adapter(model, processor)
    artifact = calibrate_vlm_guard(model, processor, PAIRS, rank=3, batch_size=3)
    harmful = hidden_states(model, adapter.build_inputs([(bad, None) for bad, _ in PAIRS]))
    harmless = hidden_states(model, adapter.build_inputs([(good, None) for _, good in PAIRS]))
    assert artifact.layers == [0, 1, 2, 3] and artifact.default_layers == middle_layers(4) == [1, 2]
    assert artifact.rank == 3 and artifact.orientation["passed"]
    for layer in (0, 1, 2):
        basis = artifact.bases[layer]
        torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
        high, low = harmful[layer] @ basis[0], harmless[layer] @ basis[0]
        assert high.mean() > low.mean()
        check = artifact.orientation["per_layer"][str(layer)]
        assert check["mean_gap"] == pytest.approx(float(high.mean() - low.mean()), rel=1e-3)
        tau = artifact.thresholds[layer]
        accuracy = ((high > tau).double().mean() + (low <= tau).double().mean()) / 2
        assert accuracy == pytest.approx(check["gate_accuracy"]) and accuracy > 0.5


def test_middle_layers_follow_the_7b_band():
    assert middle_layers(32) == list(range(10, 21)) and middle_layers(8) == [2, 3, 4, 5]


def test_artifacts_round_trip_through_safetensors(tmp_path):
    model, processor = tiny_vlm("llava")
    cmrm = calibrate_cmrm(model, processor, ANCHORS, corrupt="noise", model_name="tiny-llava")
    guard = calibrate_vlm_guard(model, processor, PAIRS, layers=[0, 3], rank=2, model_name="tiny-llava")
    for artifact, cls in ((cmrm, CmrmVectors), (guard, SafetySubspace)):
        path = artifact.save(tmp_path / "nested" / f"{artifact.kind}.safetensors")
        loaded = cls.load(path)
        assert loaded.path == str(path) and loaded.model == artifact.model and loaded.anchors == artifact.anchors
        assert loaded.model.name == "tiny-llava" and loaded.model.hidden_size == 64 and loaded.layers == artifact.layers
        for layer in artifact.layers:
            assert torch.equal(loaded._tensors_by_layer()[layer], artifact._tensors_by_layer()[layer])
    assert CmrmVectors.load(tmp_path / "nested" / "cmrm.safetensors").corruption == "noise"
    loaded = SafetySubspace.load(tmp_path / "nested" / "vlm_guard.safetensors")
    assert loaded.default_layers == [0, 3] and loaded.thresholds == guard.thresholds and loaded.rank == 2
    assert loaded.orientation == guard.orientation


def test_artifact_metadata_names_how_it_was_made(tmp_path):
    from safetensors import safe_open

    model, processor = tiny_vlm("gemma3")
    path = calibrate_vlm_guard(model, processor, PAIRS, rank=2).save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert keys == {f"basis.{layer}" for layer in range(4)}
    assert metadata["kind"] == "vlm_guard" and metadata["model_type"] == "gemma3" and metadata["rank"] == "2"
    assert metadata["hidden_size"] == "64" and json.loads(metadata["layers"]) == [0, 1, 2, 3]
    assert metadata["anchors"] == "8" and metadata["anchor_source"] == "<python list>"
    assert set(json.loads(metadata["tau"])) == {"0", "1", "2", "3"}
    assert json.loads(metadata["orientation_check"])["passed"] is True


def write_bad(tmp_path, name, tensors=None, **metadata):
    path = tmp_path / name
    base = {
        "format": "vlm-safety-plugins",
        "format_version": "1",
        "kind": "cmrm",
        "model_name": "m",
        "model_type": "llava",
        "config_hash": "x",
        "hidden_size": "4",
        "num_layers": "2",
        "layers": "[0]",
        "anchors": "1",
        "anchor_source": "s",
        "corruption": "blank",
        "alpha": "1.0",
        "orientation_check": "{}",
    }
    save_file(
        tensors if tensors is not None else {"vector.0": torch.ones(4)},
        str(path),
        metadata={key: value for key, value in {**base, **metadata}.items() if value is not None},
    )
    return path


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "cmrm artifact file not found; make one with `vlm-safety calibrate cmrm"),
        ("truncated", "not a readable safetensors file (corrupted or truncated?)"),
        ("text", "not a readable safetensors file"),
        ("foreign", "not a vlm-safety-plugins artifact"),
        ("wrong-kind", "this is a 'vlm_guard' artifact, expected a 'cmrm' one"),
        ("newer", "format version 9 is newer"),
        ("missing-key", "metadata key 'hidden_size' is missing"),
        ("bad-number", "metadata 'num_layers' must be an integer, got 'two'"),
        ("missing-tensor", "tensor 'vector.0' is missing"),
        ("bad-shape", "tensor 'vector.0' has shape (3,), expected (4,)"),
        ("not-finite", "tensor 'vector.0' is not finite floating point"),
    ],
)
def test_bad_artifact_files_are_clear_errors(tmp_path, case, fragment):
    path = {
        "missing": lambda: tmp_path / "none.safetensors",
        "truncated": lambda: _truncated(write_bad(tmp_path, "t.safetensors")),
        "text": lambda: _text_file(tmp_path / "x.safetensors"),
        "foreign": lambda: write_bad(tmp_path, "f.safetensors", format=None),
        "wrong-kind": lambda: write_bad(tmp_path, "k.safetensors", kind="vlm_guard"),
        "newer": lambda: write_bad(tmp_path, "n.safetensors", format_version="9"),
        "missing-key": lambda: write_bad(tmp_path, "m.safetensors", hidden_size=None),
        "bad-number": lambda: write_bad(tmp_path, "b.safetensors", num_layers="two"),
        "missing-tensor": lambda: write_bad(tmp_path, "v.safetensors", tensors={"other": torch.ones(4)}),
        "bad-shape": lambda: write_bad(tmp_path, "s.safetensors", tensors={"vector.0": torch.ones(3)}),
        "not-finite": lambda: write_bad(
            tmp_path, "i.safetensors", tensors={"vector.0": torch.full((4,), float("nan"))}
        ),
    }[case]()
    with pytest.raises(vsp.ArtifactError) as caught:
        CmrmVectors.load(path)
    assert str(caught.value).startswith(str(path)) and fragment in str(caught.value)


def _truncated(path):
    path.write_bytes(path.read_bytes()[:-7])
    return path


def _text_file(path):
    path.write_text("not safetensors at all")
    return path


def test_a_subspace_without_orthonormal_rows_is_rejected(tmp_path):
    model, processor = tiny_vlm("llava")
    artifact = calibrate_vlm_guard(model, processor, PAIRS, layers=[1], rank=2)
    artifact.bases[1] = artifact.bases[1] * 2
    path = artifact.save(tmp_path / "scaled.safetensors")
    with pytest.raises(vsp.ArtifactError, match="'basis.1' does not have orthonormal rows"):
        SafetySubspace.load(path)


def test_an_artifact_for_another_hidden_size_names_the_mismatch(tmp_path):
    model, processor = tiny_vlm("llava")
    adapter = find_adapter(model, processor)
    other = ModelIdentity(name="big-llava", model_type="llava", config_hash="0" * 16, hidden_size=32, num_layers=8)
    path = CmrmVectors(model=other, anchors=1, anchor_source="s", vectors={0: torch.ones(32)}).save(
        tmp_path / "big.safetensors"
    )
    with pytest.raises(vsp.ArtifactError) as caught:
        CmrmVectors.load(path).check_model(adapter)
    message = str(caught.value)
    assert message.startswith(str(path)) and "made for another model (big-llava, llava)" in message
    for fragment in (
        "hidden size 64 here, 32 in the artifact",
        "decoder layers 4 here, 8 in the artifact",
        "config hash",
    ):
        assert fragment in message


def test_config_hash_ignores_how_the_model_was_saved(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlm_safety_plugins.steering.artifacts import config_hash

    model, _ = tiny_vlm("qwen2_vl")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float16)
    assert config_hash(reloaded.config) == config_hash(model.config) != config_hash(tiny_vlm("gemma3")[0].config)


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"text": "ok"}', "{oops"], "anchors.jsonl:2: invalid JSON"),
        (['{"text": ""}'], "anchors.jsonl:1: expected a non-empty string under 'text'"),
        (['{"text": "ok", "label": "evil"}'], "anchors.jsonl:1: `label` must be one of harmful, benign"),
        (["[1, 2]"], "anchors.jsonl:1: expected a JSON object, got list"),
        (["", "  "], "anchors.jsonl: the anchor file has no records"),
    ],
)
def test_bad_anchor_files_name_file_and_line(tmp_path, lines, fragment):
    path = tmp_path / "anchors.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(vsp.ConfigError, match=fragment.replace("[", r"\[")):
        cmrm_anchors(path)


def test_shipped_anchor_sets():
    texts, source = cmrm_anchors()
    pairs, _ = vlm_guard_pairs()
    assert source == "builtin:cmrm_anchors.jsonl" and len(texts) == len(set(texts)) >= 100
    assert len(pairs) == 100 and all(bad.startswith("How to") and good.startswith("How to") for bad, good in pairs)
    with pytest.raises(vsp.ConfigError, match="anchor file not found"):
        vlm_guard_pairs("/nonexistent/pairs.jsonl")
    with pytest.raises(
        vsp.ConfigError,
        match="builtin:nope.jsonl: no shipped anchor set of that name; shipped: "
        "builtin:cmrm_anchors.jsonl, builtin:testbed_cmrm_anchors.jsonl",
    ):
        cmrm_anchors("builtin:nope.jsonl")


def test_testbed_anchor_sets_are_the_worlds_training_requests():
    from vlm_safety_plugins.testbed import world

    texts, source = cmrm_anchors("builtin:testbed_cmrm_anchors.jsonl")
    pairs, _ = vlm_guard_pairs("builtin:testbed_vlm_guard_pairs.jsonl")
    expected_anchors, expected_pairs = world.calibration_anchors()
    # regenerate after changing the world: see world.calibration_anchors
    assert texts == [record["text"] for record in expected_anchors] and source == "builtin:testbed_cmrm_anchors.jsonl"
    assert pairs == [(record["harmful"], record["harmless"]) for record in expected_pairs]
    test_requests = {
        sample.text for sample in world.samples(2000, "test", seed=0) if sample.kind in ("harmful", "benign")
    }
    assert len(test_requests) >= 50 and not test_requests & set(texts)  # no held-out request calibrates


def test_cli_calibrates_artifacts_that_a_yaml_config_then_loads(tmp_path):
    anchors, pairs = tmp_path / "anchors.jsonl", tmp_path / "pairs.jsonl"
    anchors.write_text("".join(json.dumps({"text": text}) + "\n" for text in ANCHORS))
    pairs.write_text("".join(json.dumps({"harmful": bad, "harmless": good}) + "\n" for bad, good in PAIRS))
    runner = CliRunner()
    cmrm_out, guard_out = tmp_path / "out" / "tiny.cmrm.safetensors", tmp_path / "out" / "tiny.vlm_guard.safetensors"
    result = runner.invoke(
        cli,
        [
            "calibrate",
            "cmrm",
            "--model",
            "tiny-llava",
            "--anchors",
            str(anchors),
            "--out",
            str(cmrm_out),
            "--layers",
            "1-2",
            "--corrupt",
            "noise",
            "--batch-size",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {cmrm_out}: cmrm for tiny-llava" in result.output and "layers [1, 2], 3 anchors" in result.output
    result = runner.invoke(
        cli,
        [
            "calibrate",
            "vlm-guard",
            "--model",
            "tiny-llava",
            "--anchors",
            str(pairs),
            "--out",
            str(guard_out),
            "--rank",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rank 2; default layers [1, 2]" in result.output
    config = tmp_path / "config.yaml"
    config.write_text(
        f"defenses:\n  cmrm:\n    vectors: {cmrm_out}\n  vlm_guard:\n    subspace: {guard_out}\n"
        "    mode: gated_amplify\n    tau: -1000000000.0\non_error: raise\n"
    )
    image = tmp_path / "red.png"
    tiny_image().save(image)
    result = runner.invoke(
        cli,
        [
            "generate",
            "--config",
            str(config),
            "--image",
            str(image),
            "--prompt",
            "How to steal a car?",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["safety"]["defenses"]
    assert report["cmrm"]["ran"] and report["cmrm"]["details"]["layers"] == [1, 2]
    assert report["vlm_guard"]["details"]["gate_fired"] and report["vlm_guard"]["details"]["rank"] == 2
    # the artifact is bound to its model: tiny-qwen2-vl refuses it before generating
    result = runner.invoke(
        cli,
        [
            "generate",
            "--model",
            "tiny-qwen2-vl",
            "--config",
            str(config),
            "--image",
            str(image),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ],
    )
    assert result.exit_code == 1 and f"Error: {cmrm_out}: made for another model" in result.output


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--layers", "one"], "Invalid value for '--layers'"),
        (["--anchors", "/nonexistent.jsonl"], "'--anchors'"),
        (["--model", "tiny-nothing"], "unknown offline model 'tiny-nothing'"),
    ],
)
def test_cli_calibrate_rejects_bad_input(arguments, fragment):
    result = CliRunner().invoke(cli, ["calibrate", "cmrm", *arguments])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_an_artifact_calibrated_on_other_weights_of_the_same_architecture_is_refused(calibrated, red_image):
    from .conftest import generation

    model, processor = tiny_vlm("llava", seed=1)  # same config as the calibrated seed-0 model, other weights
    vsp.attach(model, processor)
    inputs = batch(model, processor, [("What is in the picture?", red_image)])
    for kind, path, option in (
        ("cmrm", calibrated("llava")[0], "vectors"),
        ("vlm_guard", calibrated("llava")[1], "subspace"),
    ):
        options = {option: str(path), "mode": "both", "tau": -1e9} if kind == "vlm_guard" else {option: str(path)}
        config = {"defenses": {kind: options}, "on_error": "raise"}
        with pytest.raises(vsp.ArtifactError) as caught:
            model.generate(**inputs, images=[red_image], generation_config=generation(model, config, max_new_tokens=2))
        message, theirs = str(caught.value), (CmrmVectors if kind == "cmrm" else SafetySubspace).load(path)
        assert message.startswith(str(path)) and "config hash" not in message
        fingerprint = ModelIdentity.of(vsp.get_attachment(model).adapter).weights_fingerprint
        assert f"weights fingerprint {fingerprint} here, {theirs.model.weights_fingerprint} in the artifact" in message
        assert "allow_other_weights" in message
        options["allow_other_weights"] = True
        out = model.generate(
            **inputs,
            images=[red_image],
            generation_config=generation(model, config, max_new_tokens=2, return_dict_in_generate=True),
        )
        assert out.safety[0].defenses[kind].ran and out.safety[0].error is None
    vsp.detach(model)


def test_weights_fingerprint_follows_the_base_weights_not_their_dtype_or_an_unmerged_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from vlm_safety_plugins.steering.artifacts import weights_fingerprint

    def fingerprint(model, processor):
        return weights_fingerprint(find_adapter(model, processor))

    model, processor = tiny_vlm("gemma3")
    base = fingerprint(model, processor)
    assert base == fingerprint(*tiny_vlm("gemma3")) != fingerprint(*tiny_vlm("gemma3", seed=1))
    path = calibrate_vlm_guard(model, processor, PAIRS, rank=2).save(tmp_path / "g.safetensors")
    assert SafetySubspace.load(path).model.weights_fingerprint == base
    rounded = tiny_vlm("gemma3")[0].to(torch.bfloat16)  # a lossy dtype change: other values
    in_bf16 = fingerprint(rounded, processor)
    assert in_bf16 != base and fingerprint(rounded.float(), processor) == in_bf16  # upcasting keeps the values
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(model, lora)
    assert fingerprint(wrapped, processor) == base  # LoRA adds weights and leaves the base ones
    SafetySubspace.load(path).check_model(find_adapter(wrapped, processor))
    merged = wrapped.merge_and_unload()  # merging changes the base weights
    assert fingerprint(merged, processor) != base
    with pytest.raises(vsp.ArtifactError, match="weights fingerprint"):
        SafetySubspace.load(path).check_model(find_adapter(merged, processor))
    SafetySubspace.load(path).check_model(find_adapter(merged, processor), allow_other_weights=True)


def test_an_artifact_without_a_weights_fingerprint_is_refused_unless_other_weights_are_allowed(calibrated, tmp_path):
    from safetensors import safe_open

    with safe_open(str(calibrated("llava")[0]), framework="pt") as handle:
        metadata, tensors = dict(handle.metadata()), {key: handle.get_tensor(key) for key in handle.keys()}
    metadata.pop("weights_fingerprint", None)  # as written before artifacts recorded one
    old = tmp_path / "old.cmrm.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    adapter = find_adapter(*tiny_vlm("llava"))  # the very model it was calibrated on
    with pytest.raises(vsp.ArtifactError) as caught:
        CmrmVectors.load(old).check_model(adapter)
    message = str(caught.value)
    assert message.startswith(str(old)) and "records no weights fingerprint" in message
    assert "vlm-safety calibrate cmrm" in message and "allow_other_weights" in message
    CmrmVectors.load(old).check_model(adapter, allow_other_weights=True)
