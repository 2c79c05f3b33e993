"""VLM-Guard's anchor pairs: one per line, ``{"harmful": "How to ...?", "harmless": "How to ...?"}``.

The default set is ``data/vlm_guard_pairs.jsonl``; the testbed's is
``builtin:testbed_vlm_guard_pairs.jsonl`` (docs/anchors.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...core.errors import ConfigError
from ...steering.anchors import records, source_name, strings, text_field

SHIPPED = "vlm_guard_pairs.jsonl"


def vlm_guard_pairs(source: str | Path | Sequence[tuple[str, str]] | None = None) -> tuple[list[tuple[str, str]], str]:
    """((harmful, harmless) pairs, where they came from) from a JSONL file, a list, or the shipped set."""
    if source is not None and not isinstance(source, (str, Path)):
        pairs = list(source)
        if not pairs or not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
            raise ConfigError("pairs must be a non-empty list of (harmful, harmless) string pairs")
        return [(*strings(pair, "pair"),) for pair in pairs], "<python list>"
    pairs = [
        (text_field(record, "harmful", where), text_field(record, "harmless", where))
        for where, record in records(source, SHIPPED, __package__)
    ]
    return pairs, source_name(source, SHIPPED)
