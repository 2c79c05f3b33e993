"""CMRM's anchor questions: one per line, ``{"text": "...", "label": "harmful" | "benign"}``.

``label`` is optional and only documents the mix (the shift vector is a mean over all
anchors). The default set is ``data/cmrm_anchors.jsonl``; the testbed's is
``builtin:testbed_cmrm_anchors.jsonl`` (docs/anchors.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...core.errors import ConfigError
from ...steering.anchors import records, source_name, strings, text_field

SHIPPED = "cmrm_anchors.jsonl"
LABELS = ("harmful", "benign")


def cmrm_anchors(source: str | Path | Sequence[str] | None = None) -> tuple[list[str], str]:
    """(anchor questions, where they came from) from a JSONL file, a list of strings, or the shipped set."""
    if source is not None and not isinstance(source, (str, Path)):
        return strings(source, "anchors"), "<python list>"
    texts = []
    for where, record in records(source, SHIPPED, __package__):
        texts.append(text_field(record, "text", where))
        label = record.get("label")
        if label is not None and label not in LABELS:
            raise ConfigError(f"`label` must be one of {', '.join(LABELS)}, got {label!r}", source=where)
    return texts, source_name(source, SHIPPED)
