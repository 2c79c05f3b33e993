"""Anchor sets for calibration: the shipped JSONL files, or the user's own in the same format.

- CMRM (``data/cmrm_anchors.jsonl``): one question per line, ``{"text": "...", "label":
  "harmful" | "benign"}``; ``label`` is optional and only documents the mix (the shift
  vector is a mean over all anchors).
- VLM-Guard (``data/vlm_guard_pairs.jsonl``): one pair per line of the same form,
  ``{"harmful": "How to ...?", "harmless": "How to ...?"}``.

A source ``builtin:NAME`` is a file shipped in ``data/`` (the testbed's anchors:
``builtin:testbed_cmrm_anchors.jsonl``, ``builtin:testbed_vlm_guard_pairs.jsonl``).
Blank lines are skipped. Errors name the file, the line and what was expected.
``docs/anchors.md`` describes where the shipped sets come from.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ConfigError

CMRM_ANCHORS = "cmrm_anchors.jsonl"
VLM_GUARD_PAIRS = "vlm_guard_pairs.jsonl"
CMRM_LABELS = ("harmful", "benign")
BUILTIN = "builtin:"


def cmrm_anchors(source: str | Path | Sequence[str] | None = None) -> tuple[list[str], str]:
    """(anchor questions, where they came from) from a JSONL file, a list of strings, or the shipped set."""
    if source is not None and not isinstance(source, (str, Path)):
        return _strings(source, "anchors"), "<python list>"
    texts = []
    for where, record in _records(source, CMRM_ANCHORS):
        texts.append(_text(record, "text", where))
        label = record.get("label")
        if label is not None and label not in CMRM_LABELS:
            raise ConfigError(f"`label` must be one of {', '.join(CMRM_LABELS)}, got {label!r}", source=where)
    return texts, _name(source, CMRM_ANCHORS)


def vlm_guard_pairs(source: str | Path | Sequence[tuple[str, str]] | None = None
                    ) -> tuple[list[tuple[str, str]], str]:
    """((harmful, harmless) pairs, where they came from) from a JSONL file, a list, or the shipped set."""
    if source is not None and not isinstance(source, (str, Path)):
        pairs = list(source)
        if not pairs or not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
            raise ConfigError("pairs must be a non-empty list of (harmful, harmless) string pairs")
        return [(*_strings(pair, "pair"),) for pair in pairs], "<python list>"
    pairs = [(_text(record, "harmful", where), _text(record, "harmless", where))
             for where, record in _records(source, VLM_GUARD_PAIRS)]
    return pairs, _name(source, VLM_GUARD_PAIRS)


def _records(source: str | Path | None, builtin: str) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) for each non-blank line; at least one record."""
    if source is None or str(source).startswith(BUILTIN):
        name = BUILTIN + builtin if source is None else str(source)
        try:
            text = resources.files(__package__).joinpath("data", name.removeprefix(BUILTIN)).read_text("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no shipped anchor set of that name; shipped: {', '.join(shipped_anchor_sets())}",
                              source=name) from None
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


def shipped_anchor_sets() -> list[str]:
    """The anchor files shipped with the package, as ``builtin:NAME`` sources."""
    folder = resources.files(__package__).joinpath("data")
    return sorted(BUILTIN + entry.name for entry in folder.iterdir() if entry.name.endswith(".jsonl"))


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected a non-empty string under {key!r}, got {value!r}", source=where)
    return value.strip()


def _strings(values: Any, what: str) -> list[str]:
    values = list(values)
    if not values or not all(isinstance(value, str) and value.strip() for value in values):
        raise ConfigError(f"{what} must be a non-empty list of non-empty strings")
    return [value.strip() for value in values]


def _name(source: str | Path | None, builtin: str) -> str:
    return BUILTIN + builtin if source is None else str(source)
