"""Typed, documented options for defenses, validated from plain YAML/JSON data.

A defense declares its options as a dataclass whose fields are made with ``option``;
``parse_options`` turns a mapping into an instance or raises a ConfigError that names
the exact key path. The same metadata generates the configuration reference. Checks
that involve several fields go in the dataclass's ``__post_init__``: raise
``ConfigError(message, path=<field name>)`` there and the full key path and source are added.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from .errors import ConfigError

# A number in exponent notation without the dot or exponent sign YAML 1.1 requires of floats.
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
INT_LIMIT = 2**31 - 1
"""The largest magnitude any integer option takes, whatever its own range: beyond it, sizes
and counts overflow the tensors and loops they feed."""
QUOTE_LIMIT = 200
"""Values quoted in error messages are cut to this many characters."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    min_items: int | None = None,
    names_file: bool = False,
) -> Any:
    """A dataclass field with a docstring and an optional range (``above`` is exclusive).

    For a list, the range applies to each item and ``min_items`` is the fewest items allowed.
    ``names_file`` marks a value that names a file or model the process reads (an artifact,
    a checkpoint): a request may only name one the operator listed (core/policy.py).
    """
    meta = {"doc": doc, "min": min, "max": max, "above": above, "min_items": min_items, "names_file": names_file}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a defense that takes none."""


@dataclasses.dataclass(frozen=True)
class Strength:
    """An option that sets how hard a defense acts, and the values ``vlm-safety tune`` tries.

    ``option`` is a key of the defense's options (dotted for a nested one, ``best_of_n.n``);
    ``values`` go from the weakest setting to the strongest. ``refine``: a number that can
    switch the outcome sharply between two neighbours, so the tuner bisects between the
    strongest value that keeps the utility budget and the next one, which does not.
    ``when``: the option matters only where other swept options take one of these values
    (``{"mode": ("gated_amplify", "both")}``); elsewhere the tuner leaves it as the base
    config has it instead of trying settings that cannot differ.
    """

    option: str
    values: tuple[Any, ...]
    refine: bool = False
    doc: str = ""
    when: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"Strength {self.option!r}: give at least one value")
        if self.refine and not all(is_number(value) for value in self.values):
            raise ValueError(f"Strength {self.option!r}: only numbers can be refined")

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether the option matters at a setting: each option ``when`` names is absent or has one of its values."""
        return all(option not in values or values[option] in allowed for option, allowed in self.when.items())


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_options(cls: type, data: Any, *, path: str, source: str | None) -> Any:
    """Validate ``data`` (a mapping or None) against the options dataclass ``cls``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of options, got {_describe(data)}", source=source, path=path)
    require_string_keys(data, path=path, source=source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        expected = ", ".join(fields) or "no options"
        raise ConfigError(
            f"unknown key {quote(unknown[0])}; expected one of: {expected}",
            source=source,
            path=_join(path, unknown[0][:QUOTE_LIMIT]),
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError("required key is missing", source=source, path=key_path)
            continue
        value = _coerce(hints[name], data[name], path=key_path, source=source)
        _check_range(f.metadata, value, path=key_path, source=source)
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as error:  # a cross-field check in the dataclass's __post_init__
        raise ConfigError(error.reason, source=source, path=_join(path, error.path) if error.path else path) from None


def require_string_keys(data: typing.Mapping, *, path: str, source: str | None) -> None:
    """Every key of a config mapping is a string (YAML also allows numbers, nulls and lists as keys)."""
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {_describe(key)}", source=source, path=path or None)


def options_to_dict(options: Any) -> dict:
    """The JSON-only form of an options instance (nested dataclasses become mappings)."""
    return dataclasses.asdict(options)


def describe_options(cls: type) -> list[dict]:
    """One row per option: name, type, required, default, range and doc (for docs and ``--help``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints[f.name]),
                "required": required,
                "default": default,
                "doc": f.metadata.get("doc", ""),
                "range": _range_text(f.metadata),
            }
        )
    return rows


def type_name(tp: Any) -> str:
    """A short human name of a type annotation, as written in config docs."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, *, path: str, source: str | None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path=path, source=source)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(tp, value, path, source)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"expected one of {choices}, got {quote(value)}", source=source, path=path)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(tp, value, path, source)
        return [_coerce(args[0], item, path=f"{path}[{i}]", source=source) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return parse_options(tp, value, path=path, source=source)
    if tp is float and is_number(value):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        return _finite(number, value, path, source)
    if tp is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
        return _finite(float(value), value, path, source)  # PyYAML (YAML 1.1) reads 1e9 and -1.0e9 as strings
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > INT_LIMIT:
            raise ConfigError(
                f"{quote(value)} is too large; integer options lie within ±{INT_LIMIT}", source=source, path=path
            )
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is type(None) and value is None:
        return None
    raise _type_error(tp, value, path, source)


def _finite(number: float, value: Any, path: str, source: str | None) -> float:
    """``number``, unless it is NaN or infinite: no option means anything there, and every
    comparison with NaN is false, so a NaN threshold would pass every check it guards."""
    if not math.isfinite(number):
        raise ConfigError(f"expected a finite number, got {quote(value)}", source=source, path=path)
    return number


def _check_range(meta: typing.Mapping, value: Any, *, path: str, source: str | None) -> None:
    if isinstance(value, list):
        fewest = meta.get("min_items")
        if fewest is not None and len(value) < fewest:
            raise ConfigError(
                f"expected at least {fewest} item{'s' * (fewest != 1)}, got {len(value)}", source=source, path=path
            )
        for index, item in enumerate(value):
            _check_range(meta, item, path=f"{path}[{index}]", source=source)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, above = meta.get("min"), meta.get("max"), meta.get("above")
    if (
        (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
    ):
        raise ConfigError(f"{quote(value)} is out of range; expected {_range_text(meta)}", source=source, path=path)


def _range_text(meta: typing.Mapping) -> str:
    low, high, above, fewest = meta.get("min"), meta.get("max"), meta.get("above"), meta.get("min_items")
    parts = [
        f"> {above}" if above is not None else None,
        f">= {low}" if low is not None else None,
        f"<= {high}" if high is not None else None,
        f"at least {fewest} item{'s' * (fewest != 1)}" if fewest is not None else None,
    ]
    return " and ".join(p for p in parts if p)


def _type_error(tp: Any, value: Any, path: str, source: str | None) -> ConfigError:
    return ConfigError(f"expected {type_name(tp)}, got {_describe(value)}", source=source, path=path)


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {quote(value)}"


def quote(value: Any) -> str:
    """``repr(value)``, cut to QUOTE_LIMIT characters: an error names the value, it does not echo a huge one."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested data; ints beyond Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
