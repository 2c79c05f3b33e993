"""The configuration reference is generated from the schema, and the committed copy is current."""

import dataclasses
from pathlib import Path

from click.testing import CliRunner

from vlm_safety_plugins import plugins
from vlm_safety_plugins.cli import cli
from vlm_safety_plugins.config import TOP_LEVEL_KEYS
from vlm_safety_plugins.reference import configuration_reference

from .test_entrypoints import require_example_plugin

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_committed_configuration_reference_is_current():
    assert COMMITTED.read_text(encoding="utf-8") == configuration_reference(), (
        "docs/configuration.md is out of date; regenerate it: vlm-safety reference > docs/configuration.md")


def test_reference_documents_every_key_and_builtin_option_only():
    require_example_plugin()
    text = configuration_reference()
    for key in TOP_LEVEL_KEYS:
        assert f"| `{key}` |" in text
    builtin = [item for item in plugins.registry().defenses.values() if item.distribution == "vlm-safety-plugins"]
    assert builtin
    for item in builtin:
        assert f"### `{item.name}`" in text
        for field in dataclasses.fields(item.cls.Options):
            assert f"| `{field.name}` |" in text
    assert "keyword_refusal" not in text  # installed third-party plugins never leak into the docs


def test_reference_command_prints_it():
    result = CliRunner().invoke(cli, ["reference"])
    assert result.exit_code == 0 and result.output == configuration_reference()
