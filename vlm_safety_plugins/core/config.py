"""SafetyConfig: which defenses run and how, from YAML or the ``vlm_safety`` generation flag.

One schema serves both forms::

    defenses:            # applied together, in this order; each key a registered defense
      adashield: {}
    on_error: refuse     # refuse (default, fail closed) | raise
    refusal: "I'm sorry, but I can't help with that."

Every error names the source (file or ``generation_config.vlm_safety``), the key path and
what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import plugins
from .errors import ConfigError
from .options import QUOTE_LIMIT, options_to_dict, parse_options, quote, require_string_keys

GENERATION_CONFIG_KEY = "vlm_safety"
ON_ERROR_CHOICES = ("refuse", "raise")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
TOP_LEVEL_KEYS = ("defenses", "on_error", "refusal")
MAX_FILE_BYTES = 1 << 20  # a config is a few hundred bytes; a megabyte is far more than any needs
MAX_NODES = 10_000  # values in the document once aliases are expanded
MAX_DEPTH = 64


@dataclass(frozen=True)
class SafetyConfig:
    """A validated safety configuration: defense name -> its parsed options, plus policy."""

    defenses: dict[str, Any] = field(default_factory=dict)
    on_error: str = "refuse"
    refusal: str = DEFAULT_REFUSAL
    source: str | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = GENERATION_CONFIG_KEY) -> SafetyConfig:
        """Validate a plain mapping (the YAML document or the ``vlm_safety`` value)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(data).__name__}", source=source
            )
        require_string_keys(data, path="", source=source)
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key {quote(unknown[0])}; expected one of: {', '.join(TOP_LEVEL_KEYS)}",
                source=source,
                path=unknown[0][:QUOTE_LIMIT],
            )
        defenses_data = data.get("defenses")
        defenses_data = {} if defenses_data is None else defenses_data
        if not isinstance(defenses_data, Mapping):
            raise ConfigError(
                f"expected a mapping of defense name to options, got {type(defenses_data).__name__}",
                source=source,
                path="defenses",
            )
        require_string_keys(defenses_data, path="defenses", source=source)
        defenses = {}
        for name, options in defenses_data.items():
            defense_cls = plugins.get_defense(str(name), source=source)
            defenses[name] = parse_options(defense_cls.Options, options, path=f"defenses.{name}", source=source)
        on_error = data.get("on_error", "refuse")
        if on_error not in ON_ERROR_CHOICES:
            raise ConfigError(
                f"expected one of {', '.join(map(repr, ON_ERROR_CHOICES))}, got {quote(on_error)}",
                source=source,
                path="on_error",
            )
        refusal = data.get("refusal", DEFAULT_REFUSAL)
        if not isinstance(refusal, str) or not refusal.strip():
            raise ConfigError(f"expected a non-empty string, got {quote(refusal)}", source=source, path="refusal")
        return cls(defenses=defenses, on_error=on_error, refusal=refusal, source=source)

    def to_dict(self) -> dict:
        """The JSON-only form, with every default made explicit (what ``vlm_safety`` holds)."""
        return {
            "defenses": {name: options_to_dict(opts) for name, opts in self.defenses.items()},
            "on_error": self.on_error,
            "refusal": self.refusal,
        }

    def to_generation_config(self, base=None, **generation_kwargs):
        """A GenerationConfig carrying this config under ``vlm_safety``, plus any generate settings.

        ``base`` (a GenerationConfig, e.g. ``model.generation_config``) is copied first, so
        the model's own eos/pad ids and defaults are kept.
        """
        from transformers import GenerationConfig

        values = base.to_dict() if base is not None else {}
        values.update(generation_kwargs)
        values[GENERATION_CONFIG_KEY] = self.to_dict()
        values.pop("transformers_version", None)
        return GenerationConfig(**values)

    @property
    def enabled(self) -> bool:
        return bool(self.defenses)

    def cache_key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def load_config(source: str | os.PathLike | Mapping | SafetyConfig) -> SafetyConfig:
    """Load and validate a YAML file (path) or a mapping; a SafetyConfig passes through."""
    if isinstance(source, SafetyConfig):
        return source
    if isinstance(source, Mapping):
        return SafetyConfig.from_dict(source, source="<dict>")
    return SafetyConfig.from_dict(read_yaml_file(source), source=str(source))


def read_yaml_file(source: str | os.PathLike) -> Any:
    """The YAML document of a config file as plain data, with the limits of ``parse_yaml``;
    a missing, huge, unreadable or non-UTF-8 file is a ConfigError naming it."""
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"config file is {size} bytes; at most {MAX_FILE_BYTES} are read", source=str(path))
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=str(path)) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text (byte {error.start})", source=str(path)) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file: {error.strerror}", source=str(path)) from None
    return parse_yaml(text, source=str(path))


def parse_json(text: str | bytes) -> Any:
    """A JSON document as plain data (flags and bodies that servers receive). NaN and Infinity,
    which Python's json reads by default, are refused: they are not JSON. Raises ValueError."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def parse_yaml(text: str, *, source: str) -> Any:
    """A YAML document as plain data, with the limits a config needs: no duplicate keys, at most
    MAX_NODES nodes once aliases are expanded (so a "billion laughs" file is refused, not
    expanded), at most MAX_DEPTH levels of nesting."""
    loader = _StrictLoader(text)
    try:
        _check_depth(text, source)  # on the event stream, before the recursive composer sees the nesting
        node = loader.get_single_node()
        if node is not None:
            _check_size(node, source)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}invalid YAML: {getattr(error, 'problem', error)}", source=source) from None
    finally:
        loader.dispose()


def _check_depth(text: str, source: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", source=source)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; the schema check names it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key)} (first given on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node, source: str) -> None:
    """Refuse a document whose expanded tree (aliases counted each time they are used) is too big."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                break
        sizes[id(node)] = total
        return total

    if size(root) > MAX_NODES:
        raise ConfigError(
            f"the document expands to more than {MAX_NODES} values (anchors and aliases counted each time "
            "they are used); a safety config is far smaller",
            source=source,
        )
