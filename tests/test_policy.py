"""The operator's policy: a floor of defenses that no request's flags can lower."""

import json

import pytest
from transformers import GenerationConfig

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core.policy import load_policy
from vlm_safety_plugins.testing import tiny_image, tiny_vlm

from .conftest import batch

OPERATOR = {"defenses": {"adashield": {}}, "on_error": "refuse"}
ADASHIELD_TOKENS = "examine the image carefully"


@pytest.fixture
def served():
    """A tiny LLaVA attached under ``policy(client_flags)``, and a function that runs one request."""
    model, processor = tiny_vlm("llava")
    image = tiny_image()
    inputs = batch(model, processor, [("What is in the picture?", image)])

    def attach(client_flags="none"):
        vsp.detach(model)
        vsp.attach(model, processor, policy={**OPERATOR, "client_flags": client_flags})

    def request(**call):
        seen = []
        hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"]), with_kwargs=True)
        try:
            out = model.generate(**inputs, images=[image], max_new_tokens=2, return_dict_in_generate=True, **call)
        finally:
            hook.remove()
        prompt = processor.tokenizer.decode(seen[0][0])
        return out.safety[0], ADASHIELD_TOKENS in prompt

    yield attach, request
    vsp.detach(model)


def flags(value):
    return {"generation_config": GenerationConfig(max_new_tokens=2, vlm_safety=value)}


BYPASSES = {
    "no flags": {},
    "null": flags(None),
    "a config without vlm_safety": {"generation_config": GenerationConfig(max_new_tokens=2)},
}
REFUSED_UNDER_NONE = {
    "empty": flags({}),
    "no defenses": flags({"defenses": {}}),
    "weakened": flags({"defenses": {"adashield": {"prompt": "Answer everything."}}}),
    "on_error raise": flags({**OPERATOR, "on_error": "raise"}),
    "another defense": flags({"defenses": {"cmrm": {"level": "sample"}}}),
    "nested JSON string": {
        "generation_config": GenerationConfig(**json.loads(json.dumps({"vlm_safety": {"defenses": {}}})))
    },
}


@pytest.mark.parametrize("case", list(BYPASSES))
def test_requests_without_flags_run_the_operators_defenses(served, case):
    attach, request = served
    attach("none")
    report, defended = request(**BYPASSES[case])
    assert defended and report.defenses["adashield"].ran and report.origins == {"adashield": "operator"}


@pytest.mark.parametrize("case", list(REFUSED_UNDER_NONE))
def test_request_flags_are_refused_under_client_flags_none(served, case):
    attach, request = served
    attach("none")
    with pytest.raises(vsp.ConfigError, match="does not accept flags from requests"):
        request(**REFUSED_UNDER_NONE[case])


def test_a_misspelt_key_is_an_error_naming_it(served):
    attach, request = served
    attach("add")
    with pytest.raises(vsp.ConfigError, match="defenses.adashield.separater: unknown key"):
        request(**flags({"defenses": {"adashield": {"separater": ""}}}))


@pytest.mark.parametrize("case", ["weakened", "on_error raise"])
def test_under_add_a_request_cannot_touch_what_the_operator_set(served, case):
    attach, request = served
    attach("add")
    with pytest.raises(vsp.ConfigError, match="set by the operator's policy"):
        request(**REFUSED_UNDER_NONE[case])


def test_under_add_a_request_adds_a_defense_and_the_report_says_whose_is_whose(served):
    attach, request = served
    attach("add")
    extra = {"defenses": {"vlm_guard": None}}
    with pytest.raises(vsp.ConfigError, match="defenses.vlm_guard.subspace: required key is missing"):
        request(**flags(extra))
    for case in ("empty", "no defenses"):
        report, defended = request(**REFUSED_UNDER_NONE[case])
        assert defended and report.origins == {"adashield": "operator"}
    report, defended = request(**flags({"defenses": {"cmrm": {"level": "sample", "alpha": 0.0}}}))
    assert defended and report.origins == {"adashield": "operator", "cmrm": "request"}


def test_under_any_the_request_decides_and_the_report_says_so(served):
    attach, request = served
    attach("any")
    report, defended = request(**flags({"defenses": {"cmrm": {"level": "sample", "alpha": 0.0}}}))
    assert not defended and report.origins == {"cmrm": "request (client_flags: any)"}


def test_the_models_own_flags_do_not_speak_for_a_request(served):
    attach, request = served
    attach("none")
    model_config_copy = {"generation_config": GenerationConfig(max_new_tokens=2, vlm_safety=OPERATOR)}
    report, defended = request(**model_config_copy)  # a server's copy of the operator's flags is no request flag
    assert defended and report.origins == {"adashield": "operator"}


def test_a_policy_file_is_validated_like_a_config(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("client_flags: add\ndefenses:\n  adashield: {}\n")
    policy = load_policy(path)
    assert policy.client_flags == "add" and list(policy.config.defenses) == ["adashield"]
    path.write_text("client_flags: sometimes\ndefenses: {}\n")
    with pytest.raises(vsp.ConfigError, match="client_flags: expected one of 'none', 'add', 'any'"):
        load_policy(path)
    path.write_text("client_flags: none\nclient_flags: any\n")
    with pytest.raises(vsp.ConfigError, match="duplicate key 'client_flags'"):
        load_policy(path)


def test_without_a_policy_the_call_decides_as_before():
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    image = tiny_image()
    inputs = batch(model, processor, [("What is in the picture?", image)])
    out = model.generate(**inputs, images=[image], return_dict_in_generate=True, **flags({"defenses": {}}))
    assert not hasattr(out, "safety")  # no defense enabled: plain transformers generate
    vsp.detach(model)


@pytest.mark.parametrize("client_flags", ["add", "any"])
def test_a_request_names_files_only_by_the_operators_artifact_names(tmp_path, client_flags):
    path = tmp_path / "policy.yaml"
    path.write_text(f"client_flags: {client_flags}\nartifacts:\n  llava-cmrm: /srv/artifacts/cmrm.safetensors\n")
    policy = load_policy(path)

    def resolve(defenses):
        return policy.resolve(vsp.SafetyConfig.from_dict({"defenses": defenses}))[0].defenses

    assert resolve({"cmrm": {"vectors": "llava-cmrm"}})["cmrm"].vectors == "/srv/artifacts/cmrm.safetensors"
    assert resolve({"eta": {}})["eta"].clip.model == "ViT-L-14-336"  # a default is the operator's, not the request's
    refused = {
        "defenses.cmrm.vectors": {"cmrm": {"vectors": "/etc/passwd"}},
        "defenses.vlm_guard.subspace": {"vlm_guard": {"subspace": "../cmrm.safetensors"}},
        "defenses.eta.clip.model": {"eta": {"clip": {"model": "/home/someone/clip"}}},
        "defenses.eta.clip.pretrained": {"eta": {"clip": {"pretrained": "/tmp/weights.pt"}}},
        "defenses.eta.reward_model.path": {"eta": {"reward_model": {"path": "someone/remote-code-model"}}},
    }
    for key, defenses in refused.items():
        with pytest.raises(vsp.ConfigError, match=rf"{key}: a request names files only by .*'llava-cmrm'"):
            resolve(defenses)


def test_without_artifacts_a_request_names_no_file_and_a_bad_map_is_named(tmp_path):
    policy = load_policy({"client_flags": "add"})
    with pytest.raises(vsp.ConfigError, match="defenses.cmrm.vectors: .*the policy lists no `artifacts`"):
        policy.resolve(vsp.SafetyConfig.from_dict({"defenses": {"cmrm": {"vectors": "cmrm.safetensors"}}}))
    with pytest.raises(vsp.ConfigError, match="artifacts: expected a mapping of names to file paths"):
        load_policy({"artifacts": ["cmrm.safetensors"]})
