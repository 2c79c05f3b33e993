"""SafetyReport: what the defenses did to one row of a generation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PASS, MODIFIED, REFUSED = "pass", "modified", "refused"


@dataclass
class DefenseRecord:
    """One defense's work on one row: whether it ran, what it decided, its scores and time."""

    name: str
    ran: bool = False
    decision: str = PASS
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0
    replaced_answer: bool = False
    """The defense answered in the model's place (ETA's aligned answer): servers end such an
    answer with ``finish_reason: "content_filter"``."""


@dataclass
class SafetyReport:
    """Per-row outcome of a defended generation.

    ``decision`` is ``refused`` when the row's answer was replaced by the configured refusal
    (a defense refused, or one failed and ``on_error`` is ``refuse``), ``modified`` when any
    defense changed the input or the output, and ``pass`` otherwise.
    """

    row: int
    defenses: dict[str, DefenseRecord] = field(default_factory=dict)
    error: str | None = None
    refused: bool = False
    streamed_tokens: int = 0
    """Tokens of the answer that had reached the caller's streamer before it was refused."""
    origins: dict[str, str] = field(default_factory=dict)
    """Under an operator policy: each defense's origin, ``operator`` or ``request``."""
    refused_by: str | None = None
    """The defense (or ``+``-joined defenses) whose failure or veto put the refusal in place."""

    @property
    def replaced(self) -> bool:
        """The answer is not the model's own: refused, or a defense answered in its place."""
        return self.refused or any(record.replaced_answer for record in self.defenses.values())

    @property
    def decision(self) -> str:
        if self.refused:
            return REFUSED
        if any(record.decision != PASS for record in self.defenses.values()):
            return MODIFIED
        return PASS

    def to_dict(self) -> dict:
        """JSON-ready form (for logs, the CLI's ``--json`` and the ``safety_report`` hook)."""
        data = dataclasses.asdict(self)
        data["decision"], data["replaced"] = self.decision, self.replaced
        return data
