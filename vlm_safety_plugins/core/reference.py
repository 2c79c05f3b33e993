"""The configuration reference (``docs/configuration.md``), rendered from the schema itself.

Top-level keys come from ``SafetyConfig``, each built-in defense's options from its
``Options`` dataclass (``option(doc=...)``), so the document follows the code; a test
compares the committed file with ``configuration_reference()``. Defenses of third-party
plugins are left out: the document must not depend on what happens to be installed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Union

from . import plugins
from .config import ON_ERROR_CHOICES, TOP_LEVEL_KEYS, SafetyConfig
from .options import describe_options

BUILTIN_PACKAGE = __name__.split(".")[0]

# Type and meaning of each top-level key; a key added to TOP_LEVEL_KEYS without an entry
# here makes configuration_reference() fail, so the reference cannot silently miss it.
TOP_LEVEL = {
    "defenses": (
        "mapping",
        "Defenses to apply together, in the order listed: each key a registered defense "
        "name, each value its options (see below; `{}` takes every default).",
    ),
    "on_error": (
        " | ".join(map(repr, ON_ERROR_CHOICES)),
        "What happens when a defense fails: `refuse` answers every row of the call with `refusal` "
        "(fail closed); `raise` re-raises the defense's error to the caller.",
    ),
    "refusal": ("str", "The answer given to a refused row."),
}

INTRODUCTION = """\
# Configuration reference

<!-- Generated from the code by `vlm-safety reference > docs/configuration.md`; do not edit. -->

A safety configuration is a YAML file (`vsp.load_config(path)`, `vlm-safety generate --config`)
or the same mapping under the `vlm_safety` key of a `GenerationConfig`
(`cfg.to_generation_config(...)` writes it). Unknown keys are errors, and every error names
the file, the key path and what was expected.

```yaml
defenses:
  adashield: {}
on_error: refuse
```
"""


def configuration_reference() -> str:
    """The Markdown configuration reference of the top-level keys and every built-in defense."""
    defaults = {field.name: _default(field) for field in dataclasses.fields(SafetyConfig)}
    parts = [
        INTRODUCTION,
        "## Top-level keys\n",
        _table(
            ("Key", "Type", "Default", "Description"),
            [(f"`{key}`", TOP_LEVEL[key][0], _code(defaults[key]), TOP_LEVEL[key][1]) for key in TOP_LEVEL_KEYS],
        ),
        "## Defenses\n",
        "The built-in defenses. `vlm-safety plugins` lists those of installed plugins too.\n",
    ]
    builtin = sorted(
        (item for item in plugins.registry().defenses.values() if item.cls.__module__.split(".")[0] == BUILTIN_PACKAGE),
        key=lambda item: item.name,
    )
    for item in builtin:
        parts.append(_defense_section(item.name, item.cls))
    return "\n".join(parts)


def _defense_section(name: str, cls: type) -> str:
    kinds = ", ".join(f"`{kind}`" for kind in cls.kinds()) or "none"
    lines = [
        f"### `{name}`\n",
        f"{cls.description}\n" if cls.description else "",
        f"Kinds of work: {kinds}.\n",
        options_table(cls),
    ]
    return "\n".join(line for line in lines if line)


def options_table(cls: type) -> str:
    """The Markdown table of a defense's options (nested ones by dotted path), as its doc page shows it."""
    rows = [
        (f"`{path}`", row["type"], "required" if row["required"] else _code(row["default"]), row["range"], row["doc"])
        for path, row in option_rows(cls.Options)
    ]
    return _table(("Option", "Type", "Default", "Range", "Description"), rows) if rows else "No options.\n"


def option_rows(cls: type, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted key path, describe_options row) for every option of an options dataclass, nested ones included."""
    hints = typing.get_type_hints(cls)
    for row in describe_options(cls):
        path = prefix + row["name"]
        yield path, row
        nested = _nested_options(hints[row["name"]])
        if nested is not None:
            yield from option_rows(nested, prefix=f"{path}.")


def _nested_options(tp: Any) -> type | None:
    """The options dataclass a field holds (directly or as an optional value), else None."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((candidate for candidate in candidates if dataclasses.is_dataclass(candidate)), None)


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _code(value: Any) -> str:
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "".join("| " + " | ".join(_cell(cell) for cell in line) + " |\n" for line in lines)


def _cell(text: Any) -> str:
    """Table-safe text: pipes escaped (also inside code spans, as GitHub Markdown wants), one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")
