"""The example third-party plugin (entrypoints/vlm_safety_example), found through its entry point."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.testing import tiny_image, tiny_vlm

EXAMPLE_DISTRIBUTION = "vlm-safety-example"
INSTALL_HINT = "pip install --no-deps -e entrypoints/vlm_safety_example"
REQUESTS = [("What is shown in this image?", tiny_image()), ("Describe the picture in detail.", None)]
MAX_NEW_TOKENS = 12


def require_example_plugin():
    """The example plugin's module; fails (never skips) when its distribution is not installed."""
    if not any(importlib.metadata.distributions(name=EXAMPLE_DISTRIBUTION)):
        pytest.fail(f"the example plugin package is not installed; run: {INSTALL_HINT}", pytrace=False)
    from vlm_safety_example import plugin

    return plugin


@pytest.fixture(scope="module")
def example():
    return require_example_plugin()


@pytest.fixture(scope="module")
def llava():
    """An attached tiny LLaVA, its adapter, inputs for REQUESTS and their undefended new tokens."""
    model, processor = tiny_vlm("llava")
    vsp.attach(model, processor)
    adapter = vsp.get_attachment(model).adapter
    inputs = adapter.build_inputs(REQUESTS)
    vanilla = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)[:, inputs["input_ids"].shape[1] :]
    yield model, adapter, inputs, vanilla
    vsp.detach(model)


def test_example_plugin_is_discovered_through_its_entry_point(example):
    registry = plugins.registry()
    assert plugins.pm.get_plugin("example") is example
    defense, evaluator = registry.defenses["keyword_refusal"], registry.evaluators["length_evaluator"]
    from vlm_safety_example import components

    assert defense.cls is components.KeywordRefusal and evaluator.cls is components.LengthEvaluator
    for item in (defense, evaluator):
        assert (item.distribution, item.version) == (EXAMPLE_DISTRIBUTION, "0.1.0")
    assert defense.cls.kinds() == ("logits_processors",)
    assert evaluator.cls.load("unused").score(["q", "q"], ["a short answer", ""]).tolist() == [3.0, 0.0]


def test_eta_uses_the_plugins_reward_evaluator_by_name(example, llava):
    model, adapter, inputs, vanilla = llava
    eta = {
        "pre_threshold": -1.0,
        "post_threshold": -1.0,
        "clip": {"model": "tiny-clip"},
        "reward_model": {"evaluator": "length_evaluator"},
    }
    gen = vsp.SafetyConfig.from_dict({"defenses": {"eta": eta}}).to_generation_config(
        model.generation_config, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True
    )
    out = model.generate(**inputs, images=[image for _, image in REQUESTS], generation_config=gen)
    words = [len(text.split()) for text in adapter.tokenizer.batch_decode(vanilla, skip_special_tokens=True)]
    assert [report.defenses["eta"].scores["post"] for report in out.safety] == words
    wrong_kind = {**eta, "reward_model": {"evaluator": "clip"}}
    gen = vsp.SafetyConfig.from_dict({"defenses": {"eta": wrong_kind}}).to_generation_config(
        model.generation_config, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True
    )
    out = model.generate(**inputs, images=[image for _, image in REQUESTS], generation_config=gen)
    assert "reward_model.evaluator names no registered reward evaluator 'clip'" in out.safety[0].error
    assert "length_evaluator" in out.safety[0].error


def _keywords_in(vanilla, adapter):
    """Words of the undefended answers whose banned token the undefended model really generates."""
    generated = set(vanilla.flatten().tolist())
    words = " ".join(adapter.tokenizer.batch_decode(vanilla, skip_special_tokens=True)).split()
    return sorted({word for word in words if adapter.continuation_ids(" " + word)[0] in generated})


def test_keyword_refusal_enabled_from_yaml_bans_its_tokens(example, llava, tmp_path, monkeypatch):
    model, adapter, inputs, vanilla = llava
    keywords = _keywords_in(vanilla, adapter)
    assert keywords, "the undefended tiny model should generate at least one whole word"
    banned = sorted({adapter.continuation_ids(" " + word)[0] for word in keywords})
    path = tmp_path / "keywords.yaml"
    path.write_text(f"defenses:\n  keyword_refusal:\n    keywords: {json.dumps(keywords)}\n")
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv(example.AUDIT_ENV, str(audit))

    gen = vsp.load_config(path).to_generation_config(
        model.generation_config, max_new_tokens=MAX_NEW_TOKENS, return_dict_in_generate=True
    )
    out = model.generate(**inputs, images=[image for _, image in REQUESTS], generation_config=gen)
    defended = out.sequences[:, inputs["input_ids"].shape[1] :]

    assert not torch.isin(defended, torch.tensor(banned)).any()
    for row, report in enumerate(out.safety):
        record = report.defenses["keyword_refusal"]
        assert record.ran and record.details["banned_token_ids"] == banned
        hit = bool(torch.isin(vanilla[row], torch.tensor(banned)).any())
        assert (record.decision == "modified") == hit == (record.details["blocked_steps"] > 0)
        if not hit:
            assert torch.equal(defended[row], vanilla[row])
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert lines == list(example.REPORTS)[-2:] == [report.to_dict() for report in out.safety]


def test_keyword_refusal_options_are_validated(example, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("defenses:\n  keyword_refusal: {keywords: bomb}\n")
    with pytest.raises(vsp.ConfigError, match=r"defenses\.keyword_refusal\.keywords: expected list\[str\]"):
        vsp.load_config(path)


def test_environment_allowlist_and_blocklist_decide_which_entry_points_load(example):
    script = (
        "import json; from vlm_safety_plugins.core import plugins; "
        "print(json.dumps(sorted(plugins.registry().defenses)))"
    )
    clean = {name: value for name, value in os.environ.items() if name not in (plugins.ALLOW_ENV, plugins.BLOCK_ENV)}
    cases = {  # extra environment -> whether the example defense loads
        (plugins.ALLOW_ENV, ""): False,
        (plugins.BLOCK_ENV, "example"): False,
        (plugins.ALLOW_ENV, "example"): True,
    }
    running = {
        case: subprocess.Popen(
            [sys.executable, "-c", script],
            env={**clean, case[0]: case[1]},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in cases
    }
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        defenses = json.loads(stdout.splitlines()[-1])
        assert "adashield" in defenses, case  # built-ins are not entry points: always registered
        assert ("keyword_refusal" in defenses) is cases[case], case


def test_an_entry_point_name_declared_by_two_distributions_loads_only_when_qualified(example, tmp_path):
    """A second distribution declaring the entry point ``example`` (put first on the path) must not be
    imported under a bare allowlist: the clash is an error naming both, ``distribution:name`` settles it."""
    (tmp_path / "impostor_plugin.py").write_text('"""Imported only when chosen by name and distribution."""\n')
    info = tmp_path / "impostor_plugins-6.6.6.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor-plugins\nVersion: 6.6.6\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\nexample = impostor_plugin\n")
    script = (
        "import json, sys; from vlm_safety_plugins.core import plugins\n"
        "try: defenses, error = sorted(plugins.registry().defenses), None\n"
        "except Exception as caught: defenses, error = [], f'{type(caught).__name__}: {caught}'\n"
        "modules = [name for name in ('vlm_safety_example.plugin', 'impostor_plugin') if name in sys.modules]\n"
        "print(json.dumps([defenses, error, modules]))"
    )
    clean = {name: value for name, value in os.environ.items() if name not in (plugins.ALLOW_ENV, plugins.BLOCK_ENV)}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    real, impostor = ["vlm_safety_example.plugin"], ["impostor_plugin"]
    cases = {  # extra environment -> the modules imported (None: a clash error, nothing imported)
        (plugins.ALLOW_ENV, "example"): None,
        (plugins.BLOCK_ENV, ""): None,
        (plugins.BLOCK_ENV, "example"): [],  # a bare name blocks every entry point of that name
        (plugins.ALLOW_ENV, "vlm-safety-example:example"): real,
        (plugins.BLOCK_ENV, "impostor-plugins:example"): real,
        (plugins.ALLOW_ENV, "Impostor_Plugins:example"): impostor,  # distribution names are normalized
    }
    running = {
        case: subprocess.Popen(
            [sys.executable, "-c", script], env={**clean, case[0]: case[1]}, stdout=subprocess.PIPE, text=True
        )
        for case in cases
    }
    for case, process in running.items():
        defenses, error, modules = json.loads(process.communicate(timeout=300)[0].splitlines()[-1])
        if cases[case] is None:
            assert error and error.startswith("ConfigError") and modules == [], (case, error, modules)
            assert "'example'" in error and "impostor-plugins" in error and EXAMPLE_DISTRIBUTION in error, error
        else:
            assert error is None and modules == cases[case], (case, error, modules)
            assert ("keyword_refusal" in defenses) is (modules == real), case
    # the command line says it in one line, no traceback
    cli_run = subprocess.run(
        [sys.executable, "-c", "from vlm_safety_plugins.cli import cli; cli()", "--help"],
        env={**clean, plugins.ALLOW_ENV: "example"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli_run.returncode == 1 and "Traceback" not in cli_run.stderr, cli_run.stderr
    assert cli_run.stderr.startswith("Error: ") and "impostor-plugins" in cli_run.stderr
