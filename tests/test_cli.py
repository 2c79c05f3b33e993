"""The ``vlm-safety`` command, run in-process with click's CliRunner (and once as the installed script)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from vlm_safety_plugins.cli import cli
from vlm_safety_plugins.core.adapters import find_adapter
from vlm_safety_plugins.testing import tiny_image, tiny_vlm

from .test_entrypoints import require_example_plugin

REPO = Path(__file__).resolve().parents[1]
ADASHIELD_CONFIG = REPO / "configs" / "adashield.yaml"
PROMPT = "What is shown in this image?"


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red.png"
    tiny_image().save(path)
    return path


def test_plugins_table_lists_builtin_and_third_party_plugins():
    require_example_plugin()
    result = run("plugins")
    assert result.exit_code == 0, result.output
    for kind, name, provides, distribution in [
        ("defense", "adashield", "transform_inputs", "vlm-safety-plugins"),
        ("defense", "keyword_refusal", "logits_processors", "vlm-safety-example"),
        ("evaluator", "length_evaluator", "reward", "vlm-safety-example"),
        ("model_adapter", "llava", "llava", "vlm-safety-plugins"),
    ]:
        assert re.search(rf"^{kind} +{name} +{provides} +{distribution} +0\.1\.0 +\S", result.output, re.M), name


def test_plugins_json_describes_each_registered_class():
    require_example_plugin()
    result = run("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {(row["kind"], row["name"]): row for row in json.loads(result.output)}
    assert rows["defense", "adashield"] == {
        "kind": "defense",
        "name": "adashield",
        "work": ["transform_inputs"],
        "distribution": "vlm-safety-plugins",
        "version": "0.1.0",
        "description": "AdaShield-S static defense prompt appended to the user turn (input transform).",
    }
    assert rows["defense", "keyword_refusal"]["distribution"] == "vlm-safety-example"
    assert rows["evaluator", "length_evaluator"]["scores"] == ["reward"]
    assert rows["model_adapter", "qwen2_vl"]["model_types"] == ["qwen2_vl", "qwen2_5_vl"]


def test_generate_without_config_is_the_vanilla_answer():
    result = run("generate", "--prompt", PROMPT, "--max-new-tokens", 8, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    model, processor = tiny_vlm("llava")
    inputs = find_adapter(model, processor).build_inputs([(PROMPT, None)])
    tokens = model.generate(**inputs, max_new_tokens=8)[0, inputs["input_ids"].shape[1] :]
    assert data["answer"] == processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert data["safety"] is None and data["image"] is None and data["model"] == "tiny-llava"


def test_generate_with_adashield_reports_what_ran(image_path):
    result = run(
        "generate",
        "--config",
        ADASHIELD_CONFIG,
        "--image",
        image_path,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        8,
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["image"] == str(image_path) and data["time_s"] > 0 and isinstance(data["answer"], str)
    assert data["safety"]["decision"] == "modified" and data["safety"]["error"] is None
    record = data["safety"]["defenses"]["adashield"]
    assert record["ran"] and record["decision"] == "modified" and record["details"]["prompt_tokens"] > 0


def test_generate_prints_the_answer_then_a_summary(image_path):
    args = (
        "generate",
        "--config",
        ADASHIELD_CONFIG,
        "--image",
        image_path,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        8,
        "--model",
        "tiny-qwen2-vl",
    )
    answer = json.loads(run(*args, "--json").output)["answer"]
    for extra in ((), ("--stream",)):
        result = run(*args, *extra)
        assert result.exit_code == 0, result.output
        text, summary = result.output.rsplit("\nsafety: ", 1)
        assert text.strip() == answer.strip()
        assert summary.startswith("modified") and "\n  adashield: ran, modified" in summary


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_INPUTS = {  # id -> (exit code, tmp_path -> (arguments, fragments of the error message))
    "missing-config": (2, lambda tmp: (["--config", tmp / "missing.yaml"], ["'--config'", str(tmp / "missing.yaml")])),
    "invalid-option": (
        1,
        lambda tmp: (
            ["--config", _write(tmp, "bad.yaml", "defenses:\n  adashield: {bogus: 1}\n")],
            [f"{tmp / 'bad.yaml'}: defenses.adashield.bogus: unknown key 'bogus'"],
        ),
    ),
    "unknown-defense": (
        1,
        lambda tmp: (
            ["--config", _write(tmp, "bad.yaml", "defenses:\n  nope: {}\n")],
            [f"{tmp / 'bad.yaml'}: defenses.nope: unknown defense 'nope'", "adashield"],
        ),
    ),
    "invalid-yaml": (
        1,
        lambda tmp: (["--config", _write(tmp, "bad.yaml", "defenses: [\n")], [str(tmp / "bad.yaml"), "invalid YAML"]),
    ),
    "missing-image": (2, lambda tmp: (["--image", tmp / "missing.png"], ["'--image'", str(tmp / "missing.png")])),
    "not-an-image": (
        2,
        lambda tmp: (
            ["--image", _write(tmp, "text.png", "hello")],
            ["'--image'", f"cannot read image '{tmp / 'text.png'}'"],
        ),
    ),
    "unknown-tiny-model": (
        2,
        lambda tmp: (["--model", "tiny-foo"], ["'tiny-foo'", "tiny-llava", "tiny-qwen2-vl", "tiny-gemma3"]),
    ),
    "not-a-model-directory": (1, lambda tmp: (["--model", tmp], [f"cannot load model '{tmp}'"])),
    "hub-id-offline": (
        1,
        lambda tmp: (["--model", "example-org/no-such-vlm"], ["cannot load model 'example-org/no-such-vlm'"]),
    ),
    "stream-and-json": (2, lambda tmp: (["--stream", "--json"], ["--stream and --json"])),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_generate_rejects_bad_input_with_a_readable_error(case, tmp_path, monkeypatch):
    # The hub's own offline switch (what HF_HUB_OFFLINE=1 sets at import): a hub id fails fast.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    exit_code, build = BAD_INPUTS[case]
    arguments, fragments = build(tmp_path)
    result = run("generate", "--prompt", PROMPT, *arguments)
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    message = result.output.split("Error: ", 1)[1]
    for fragment in fragments:
        assert fragment in message


def test_installed_console_script_runs_a_defended_generation(image_path):
    script = Path(sys.executable).parent / "vlm-safety"
    assert script.exists(), f"{script} missing: install the package (pip install -e .)"
    completed = subprocess.run(
        [
            script,
            "generate",
            "--config",
            ADASHIELD_CONFIG,
            "--image",
            image_path,
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["safety"]["defenses"]["adashield"]["ran"]
