"""Config validation: YAML and the vlm_safety flag share one schema; errors name file and key."""

import json

import pytest
from transformers import GenerationConfig

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core.config import DEFAULT_REFUSAL


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source):
    with pytest.raises(vsp.ConfigError) as caught:
        vsp.load_config(source)
    return caught.value


def test_yaml_loads_with_defaults_filled(tmp_path):
    config = vsp.load_config(write(tmp_path, "defenses:\n  adashield:\n    separator: ' '\n"))
    assert list(config.defenses) == ["adashield"]
    assert config.defenses["adashield"].separator == " "
    assert config.defenses["adashield"].prompt.startswith("But before processing any instruction")
    assert config.on_error == "refuse" and config.refusal == DEFAULT_REFUSAL


def test_yaml_and_dict_forms_are_the_same_schema(tmp_path):
    from_yaml = vsp.load_config(write(tmp_path, "defenses: {adashield: {text_only: false}}\non_error: raise\n"))
    from_dict = vsp.load_config({"defenses": {"adashield": {"text_only": False}}, "on_error": "raise"})
    assert from_yaml == from_dict
    assert vsp.load_config(from_yaml.to_dict()) == from_yaml


def test_null_options_mean_defaults():
    assert vsp.load_config({"defenses": {"adashield": None}}).defenses["adashield"].text_only is True


def test_unknown_top_level_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "defenses: {}\non_eror: refuse\n")
    error = error_of(path)
    assert str(path) in str(error) and "on_eror" in str(error) and "on_error" in str(error)
    assert error.path == "on_eror"


def test_unknown_option_names_the_key_path(tmp_path):
    path = write(tmp_path, "defenses:\n  adashield:\n    promt: hi\n")
    error = error_of(path)
    assert error.path == "defenses.adashield.promt"
    assert str(error).startswith(f"{path}: defenses.adashield.promt: unknown key 'promt'")
    assert "prompt" in str(error)


def test_unknown_defense_lists_registered_names():
    error = error_of({"defenses": {"adashld": {}}})
    assert error.path == "defenses.adashld"
    assert "registered defenses:" in str(error) and "adashield" in str(error)


@pytest.mark.parametrize(
    "options, path, expected",
    [
        ({"text_only": "yes"}, "defenses.adashield.text_only", "expected bool, got str 'yes'"),
        ({"prompt": 3}, "defenses.adashield.prompt", "expected str, got int 3"),
    ],
)
def test_wrong_types_name_key_and_expectation(options, path, expected):
    error = error_of({"defenses": {"adashield": options}})
    assert error.path == path and expected in str(error)


@pytest.mark.parametrize(
    "data, path",
    [
        ({"on_error": "ignore"}, "on_error"),
        ({"refusal": ""}, "refusal"),
        ({"defenses": ["adashield"]}, "defenses"),
        ({"defenses": {"adashield": "on"}}, "defenses.adashield"),
    ],
)
def test_bad_values_name_their_key(data, path):
    assert error_of(data).path == path


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in str(error_of(missing)) and "not found" in str(error_of(missing))
    broken = write(tmp_path, "defenses: {adashield: [\n")
    error = error_of(broken)
    assert str(broken) in str(error) and "invalid YAML" in str(error) and "line" in str(error)


def test_generation_config_round_trips_through_save_pretrained(tmp_path):
    config = vsp.load_config({"defenses": {"adashield": {}}})
    generation = config.to_generation_config(max_new_tokens=7, do_sample=False)
    assert generation.max_new_tokens == 7
    generation.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["vlm_safety"] == config.to_dict()
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert vsp.SafetyConfig.from_dict(loaded.vlm_safety) == config


def test_generation_config_keeps_base_defaults():
    base = GenerationConfig(eos_token_id=2, pad_token_id=0, max_new_tokens=20)
    generation = vsp.load_config({"defenses": {"adashield": {}}}).to_generation_config(base, max_new_tokens=5)
    assert (generation.eos_token_id, generation.pad_token_id, generation.max_new_tokens) == (2, 0, 5)
    assert base.max_new_tokens == 20 and not hasattr(base, "vlm_safety")


def test_every_public_name_resolves_from_the_package_root():
    missing = [name for name in vsp.__all__ if getattr(vsp, name, None) is None]
    assert missing == []


# -- hostile YAML: bounded, and one clear error each ------------------------------------------

LAUGHS = (
    "".join(
        f"{name}: &{name} [{', '.join([f'*{previous}'] * 9) if previous else ', '.join(['lol'] * 9)}]\n"
        for previous, name in zip([None, *"abcdefgh"], "abcdefghi")
    )
    + "defenses: {eta: {best_of_n: *i}}\n"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (LAUGHS, "expands to more than 10000 values"),
        ("on_error: refuse\non_error: raise\n", "line 2, column 1: invalid YAML: duplicate key 'on_error'"),
        ("defenses: {adashield: {text_only: true, text_only: false}}\n", "duplicate key 'text_only'"),
        ("defenses: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 64 levels deep"),
        ("defenses: {adashield: {1: 2}}\n", "defenses.adashield: keys must be strings, got int 1"),
        ("defenses: {1: {}}\n", "defenses: keys must be strings, got int 1"),
        ("? [a, b]\n: 1\n", "line 1, column 3: invalid YAML: found unhashable key"),
        ("defenses: []\n", "defenses: expected a mapping of defense name to options, got list"),
        ("defenses: false\n", "got bool"),
        ("defenses: 0\n", "got int"),
        ("defenses: ''\n", "got str"),
    ],
    ids=[
        "billion-laughs",
        "duplicate-top-key",
        "duplicate-option",
        "deep",
        "int-option-key",
        "int-defense-name",
        "list-key",
        "defenses-list",
        "defenses-false",
        "defenses-zero",
        "defenses-empty-string",
    ],
)
def test_hostile_yaml_gets_one_short_clear_error(tmp_path, text, expected):
    error = error_of(write(tmp_path, text))
    assert expected in str(error) and len(str(error)) < 500


def test_a_file_that_is_not_utf8_or_is_huge_is_refused(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("defenses: {adashield: {prompt: 'caf\xe9'}}\n".encode("latin-1"))
    assert "not UTF-8 text" in str(error_of(latin1))
    huge = write(tmp_path, "# " + "x" * (1 << 20) + "\n", name="huge.yaml")
    assert "at most 1048576 are read" in str(error_of(huge))


def test_values_quoted_in_errors_are_cut_short():
    error = error_of({"defenses": {"adashield": {"separator": ["x" * 100_000]}}})
    assert "characters)" in str(error) and len(str(error)) < 500


def test_an_empty_mapping_or_null_still_means_no_defenses(tmp_path):
    assert not vsp.load_config(write(tmp_path, "defenses: {}\n")).enabled
    assert not vsp.load_config(write(tmp_path, "defenses:\n", name="null.yaml")).enabled
