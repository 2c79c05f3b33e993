"""CMRM's calibration artifact: one shift vector per decoder layer (``vector.<layer>``, shape d)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...core.errors import ArtifactError
from ...steering.artifacts import Artifact

CALIBRATIONS = ("one_shot", "sequential")


@dataclass(eq=False)
class CmrmVectors(Artifact):
    """CMRM's dataset-level shift: per layer, ``v_l = mean_i[h_l(text-only) − h_l(corrupted image)]``."""

    kind: ClassVar[str] = "cmrm"
    command: ClassVar[str] = "cmrm"
    tensor_name: ClassVar[str] = "vector"
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    corruption: str = "blank"
    alpha: float = 1.0
    """The α the vectors were measured for: 1 for one-shot vectors, the steering α for sequential ones."""
    calibration: str = "one_shot"
    """``one_shot`` (every layer from one unsteered pass, the paper) or ``sequential`` (calibration.py)."""
    orientation: dict = field(default_factory=dict)

    def _tensors_by_layer(self):
        return self.vectors

    def summary(self) -> str:
        """One line on how the vectors were made and how well their direction checks out."""
        moved = ", ".join(f"{layer}: {share:.2f}" for layer, share in self.orientation.get("moved_closer", {}).items())
        return (
            f"{self.calibration.replace('_', '-')} calibration (α {self.alpha:g}); corruption {self.corruption}; "
            f"share of anchors moved closer to text-only per layer: {moved}"
        )

    def _metadata(self):
        return {
            "corruption": self.corruption,
            "alpha": repr(self.alpha),
            "calibration": self.calibration,
            "orientation_check": json.dumps(self.orientation),
        }

    @classmethod
    def _from_parts(cls, by_layer, reader, **common):
        corruption = reader.text("corruption")
        if corruption not in ("blank", "noise"):
            raise ArtifactError(
                f"metadata `corruption` must be 'blank' or 'noise', got {corruption!r}", source=reader.source
            )
        calibration = reader.values.get("calibration", "one_shot")  # artifacts made before it was recorded
        if calibration not in CALIBRATIONS:
            raise ArtifactError(
                f"metadata `calibration` must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}",
                source=reader.source,
            )
        return cls(
            vectors=by_layer,
            corruption=corruption,
            alpha=reader.number("alpha"),
            calibration=calibration,
            orientation=reader.json("orientation_check", dict),
            **common,
        )

    def _validate(self, source):
        for layer, vector in self.vectors.items():
            if vector.shape != (self.model.hidden_size,):
                raise ArtifactError(
                    f"tensor 'vector.{layer}' has shape {tuple(vector.shape)}, expected "
                    f"({self.model.hidden_size},) for hidden size {self.model.hidden_size}",
                    source=source,
                )
