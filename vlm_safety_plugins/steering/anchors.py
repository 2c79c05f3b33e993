"""Anchor files for calibration: JSONL records, from a user's file or a set a defense ships.

One JSON object per line; blank lines are skipped. A source ``builtin:NAME`` is a file in
the ``data/`` folder of the defense that reads it (``--anchors
builtin:testbed_cmrm_anchors.jsonl``). Errors name the file, the line and what was
expected. Each steering defense reads its own record shape with these helpers (its
``anchors.py``); ``docs/anchors.md`` describes the formats and where the shipped sets come
from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

BUILTIN = "builtin:"


def records(source: str | Path | None, builtin: str, package: str) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) for each non-blank line of ``source`` (None: the shipped file
    ``builtin``; ``builtin:NAME``: a file in ``package``'s ``data/``); at least one record."""
    if source is None or str(source).startswith(BUILTIN):
        name = BUILTIN + builtin if source is None else str(source)
        try:
            text = resources.files(package).joinpath("data", name.removeprefix(BUILTIN)).read_text("utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"no shipped anchor set of that name; shipped: {', '.join(shipped_anchor_sets(package))}", source=name
            ) from None
    else:
        path = Path(source).expanduser()
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("anchor file not found", source=name) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read anchor file: {error}", source=name) from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"invalid JSON: {error.msg}", source=where) from None
        if not isinstance(record, dict):
            raise ConfigError(f"expected a JSON object, got {type(record).__name__}", source=where)
        count += 1
        yield where, record
    if not count:
        raise ConfigError("the anchor file has no records", source=name)


def shipped_anchor_sets(package: str) -> list[str]:
    """The anchor files shipped in ``package``'s ``data/`` folder, as ``builtin:NAME`` sources."""
    folder = resources.files(package).joinpath("data")
    return sorted(BUILTIN + entry.name for entry in folder.iterdir() if entry.name.endswith(".jsonl"))


def text_field(record: dict, key: str, where: str) -> str:
    """The non-empty string under ``key``, else a ConfigError naming ``where``."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected a non-empty string under {key!r}, got {value!r}", source=where)
    return value.strip()


def strings(values: Any, what: str) -> list[str]:
    """A non-empty list of non-empty strings, stripped, else a ConfigError."""
    values = list(values)
    if not values or not all(isinstance(value, str) and value.strip() for value in values):
        raise ConfigError(f"{what} must be a non-empty list of non-empty strings")
    return [value.strip() for value in values]


def source_name(source: str | Path | None, builtin: str) -> str:
    """How a source is reported: the file, or ``builtin:NAME`` for a shipped set."""
    return BUILTIN + builtin if source is None else str(source)
