"""A property-based fuzzer of safety configs: mutations of every file in configs/.

Each mutated document must load as a valid config, or fail with one ConfigError that
names where (a key path, or a line of the file); never another exception, a hang, or an
accepted invalid value. Bounded in examples and time so the suite stays quick.
"""

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlm_safety_plugins as vsp
from vlm_safety_plugins.core.options import INT_LIMIT, QUOTE_LIMIT

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DOCUMENTS = {path.name: yaml.safe_load(path.read_text(encoding="utf-8")) for path in CONFIGS}

HOSTILE = [math.nan, math.inf, -math.inf, "1e999", "-1e999", 10**30, -(10**30), -1, 0, -1e-9, "", " ", None, True, []]
BAD_VALUES = st.one_of(
    st.sampled_from(HOSTILE),
    st.sampled_from(HOSTILE),  # twice as likely as each other kind
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=40),
    st.text(min_size=300, max_size=2000),
    st.lists(st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def key_paths(node, prefix=()):
    """Every (path of keys) to a value inside nested mappings."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from key_paths(value, (*prefix, key))


@st.composite
def mutated(draw):
    """(file name, YAML text, must fail): one shipped config with a few random mutations; ``must
    fail`` when a mutation made it invalid whatever the schema says (a duplicate key, nesting
    too deep, a non-mapping ``defenses``)."""
    name = draw(st.sampled_from(sorted(DOCUMENTS)))
    document = copy.deepcopy(DOCUMENTS[name])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = list(key_paths(document))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["drop", "rename", "replace", "wrap"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "rename":
            parent[draw(st.text(min_size=1, max_size=12))] = parent.pop(path[-1])
        elif action == "replace":
            parent[path[-1]] = draw(BAD_VALUES)
        else:  # a list where a mapping or value was
            parent[path[-1]] = [parent[path[-1]]]
    text = yaml.safe_dump(document, allow_unicode=True)
    tail = draw(st.sampled_from(["", "on_error: raise\n", "anchors\n", "deep\n", "\t: bad indentation\n"]))
    must_fail = isinstance(document, dict) and not isinstance(document.get("defenses", {}), (dict, type(None)))
    if tail == "on_error: raise\n":
        must_fail |= isinstance(document, dict) and "on_error" in document  # given twice
    elif tail == "anchors\n":
        tail = "x: &a [1, 1, 1, 1]\ny: &b [*a, *a, *a, *a]\nz: [*b, *b, *b, *b]\n"
    elif tail == "deep\n":
        tail, must_fail = "deep: " + "[" * 80 + "]" * 80 + "\n", True
    return name, text + tail, must_fail


def assert_valid(config):
    """An accepted config holds only finite numbers within range: it survives its own round trip."""

    def walk(value):
        if isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            assert abs(value) <= INT_LIMIT
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    data = config.to_dict()
    walk(data)
    assert vsp.load_config(data) == config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    assert_valid(vsp.load_config(path))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)
@given(case=mutated())
def test_a_mutated_config_is_valid_or_one_clear_error(tmp_path_factory, case):
    name, text, must_fail = case
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_text(text, encoding="utf-8")
    try:
        config = vsp.load_config(path)
    except vsp.ConfigError as error:
        message = str(error)
        assert message.startswith(str(path)), message
        assert error.path or "line " in message or "expands to" in message or "nested" in message, message
        assert len(message) < len(str(path)) + 2 * QUOTE_LIMIT + 300, message
        return
    assert not must_fail, f"accepted an invalid document:\n{text}"
    assert_valid(config)
