"""Typed options: ranges, nested mappings, lists and optional values, each error at its key path."""

from dataclasses import dataclass

import pytest

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core import plugins
from vlm_safety_plugins.core.options import describe_options, option, parse_options


@dataclass(frozen=True)
class Sampling:
    n: int = option(5, doc="candidates", min=1)
    top_p: float = option(1.0, doc="nucleus", above=0.0, max=1.0)


@dataclass(frozen=True)
class RangedOptions:
    sampling: Sampling = option(Sampling(), doc="nested")
    layers: list[int] | None = option(None, doc="layer list")
    mode: str = option("add", doc="mode")


class RangedDefense(vsp.Defense):
    name = "ranged_test_defense"
    Options = RangedOptions


class RangedPlugin:
    @vsp.hookimpl
    def register_defenses(self, register):
        register(RangedDefense)


@pytest.fixture
def ranged_plugin():
    plugin = RangedPlugin()
    plugins.pm.register(plugin, name="ranged-test")
    yield
    plugins.pm.unregister(plugin)


@pytest.mark.parametrize(
    "sampling, path, message",
    [
        ({"n": -1}, "defenses.ranged_test_defense.sampling.n", "-1 is out of range; expected >= 1"),
        (
            {"top_p": 1.5},
            "defenses.ranged_test_defense.sampling.top_p",
            "1.5 is out of range; expected > 0.0 and <= 1.0",
        ),
        ({"top_p": 0}, "defenses.ranged_test_defense.sampling.top_p", "expected > 0.0"),
        ({"n": 2.5}, "defenses.ranged_test_defense.sampling.n", "expected int, got float 2.5"),
        ({"n": True}, "defenses.ranged_test_defense.sampling.n", "expected int, got bool True"),
    ],
)
def test_out_of_range_and_wrong_type_name_the_nested_key(ranged_plugin, sampling, path, message):
    with pytest.raises(vsp.ConfigError) as caught:
        vsp.load_config({"defenses": {"ranged_test_defense": {"sampling": sampling}}})
    assert caught.value.path == path and message in str(caught.value)


def test_runtime_registered_plugin_parses_nested_lists_and_optionals(ranged_plugin):
    config = vsp.load_config(
        {"defenses": {"ranged_test_defense": {"sampling": {"n": 3, "top_p": 1}, "layers": [1, 2]}}}
    )
    options = config.defenses["ranged_test_defense"]
    assert options.sampling == Sampling(n=3, top_p=1.0) and options.layers == [1, 2]
    assert config.to_dict()["defenses"]["ranged_test_defense"]["sampling"] == {"n": 3, "top_p": 1.0}


def test_list_items_are_checked_with_their_index():
    with pytest.raises(vsp.ConfigError) as caught:
        parse_options(RangedOptions, {"layers": [1, "x"]}, path="defenses.r", source="f.yaml")
    assert str(caught.value) == "f.yaml: defenses.r.layers[1]: expected int, got str 'x'"


def test_unregistered_plugin_disappears_from_the_registry(ranged_plugin):
    assert "ranged_test_defense" in plugins.registry().defenses
    plugin = plugins.pm.unregister(name="ranged-test")
    assert "ranged_test_defense" not in plugins.registry().defenses
    plugins.pm.register(plugin, name="ranged-test")


def test_describe_options_gives_types_defaults_and_ranges():
    rows = {row["name"]: row for row in describe_options(Sampling)}
    assert rows["n"] == {
        "name": "n",
        "type": "int",
        "required": False,
        "default": 5,
        "doc": "candidates",
        "range": ">= 1",
    }
    assert rows["top_p"]["range"] == "> 0.0 and <= 1.0"
    assert {row["name"]: row["type"] for row in describe_options(RangedOptions)}["layers"] == "list[int] | null"


def test_describe_options_marks_options_without_default_as_required():
    @dataclass(frozen=True)
    class WithRequired:
        vectors: str = option(doc="artifact path")
        alpha: float = option(1.0, doc="strength")

    assert {row["name"]: row["required"] for row in describe_options(WithRequired)} == {"vectors": True, "alpha": False}


def test_list_options_check_each_item_and_their_count():
    @dataclass(frozen=True)
    class Layers:
        layers: list[int] = option([0], doc="Layers.", min=0, min_items=1)

    assert parse_options(Layers, {"layers": [2, 0]}, path="p", source="s").layers == [2, 0]
    for value, path, message in (
        ([], "p.layers", "expected at least 1 item, got 0"),
        ([1, -1], "p.layers[1]", "-1 is out of range; expected >= 0 and at least 1 item"),
    ):
        with pytest.raises(vsp.ConfigError) as caught:
            parse_options(Layers, {"layers": value}, path="p", source="s")
        assert caught.value.path == path and message in str(caught.value)
    assert describe_options(Layers)[0]["range"] == ">= 0 and at least 1 item"


def test_exponent_numbers_that_yaml_reads_as_strings_are_floats(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_text("defenses:\n  eta: {post_threshold: -1e9, pre_threshold: 1.0}\n")
    assert vsp.load_config(path).defenses["eta"].post_threshold == -1e9
    with pytest.raises(vsp.ConfigError, match=r"defenses\.eta\.post_threshold: expected float, got str 'low'"):
        vsp.SafetyConfig.from_dict({"defenses": {"eta": {"post_threshold": "low"}}})
