"""VLM-Guard's calibration artifact: per decoder layer an oriented safety basis (``basis.<layer>``,
m × d, orthonormal rows, row 0 harmful-high) and a gate threshold τ."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...core.errors import ArtifactError
from ...core.options import is_number
from ...steering.artifacts import Artifact

TAU_FROM = ("text", "image")
"""The anchors a gate threshold can be calibrated on: text only, or asked with a corrupted image."""


@dataclass(eq=False)
class SafetySubspace(Artifact):
    """VLM-Guard's safety steering subspace: per layer, top-m right singular vectors of the
    harmful − harmless anchor differences (row 0 oriented harmful-high) and a gate threshold τ."""

    kind: ClassVar[str] = "vlm_guard"
    command: ClassVar[str] = "vlm-guard"
    tensor_name: ClassVar[str] = "basis"
    bases: dict[int, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)
    default_layers: list[int] = field(default_factory=list)
    orientation: dict = field(default_factory=dict)
    tau_from: str = "text"
    """The anchors τ separates: text only (the paper), or asked with a corrupted image (calibration.py)."""

    @property
    def rank(self) -> int:
        return min(basis.shape[0] for basis in self.bases.values())

    def gate_gap(self, layer: int) -> float:
        """The distance between the mean gate projections of the harmful and the harmless anchors τ_layer
        was cut between: the unit ``tau_shift`` counts in."""
        per_layer = self.orientation.get("per_layer")
        check = per_layer.get(str(layer)) if isinstance(per_layer, dict) else None
        gap = check.get("gate_gap") if isinstance(check, dict) else None
        if not (is_number(gap) and math.isfinite(gap) and gap > 0):
            raise ArtifactError(
                f"defenses.vlm_guard.tau_shift needs the anchor gap of layer {layer}, which the artifact does not "
                f"record as a positive number (found {gap!r}): recalibrate it, or set tau itself",
                source=self.path,
            )
        return float(gap)

    def _tensors_by_layer(self):
        return self.bases

    def summary(self) -> str:
        """One line on the subspace: rank, default layers, per layer τ and share of pairs ordered right."""
        checks = self.orientation.get("per_layer", {})
        per_layer = ", ".join(
            f"{layer}: τ={self.thresholds[int(layer)]:.4g} {check['pair_accuracy']:.2f}"
            for layer, check in checks.items()
        )
        return (
            f"rank {self.rank}; default layers {self.default_layers}; τ from {self.tau_from} anchors; per layer τ "
            f"and share of pairs with harmful above harmless: {per_layer}"
        )

    def _metadata(self):
        return {
            "rank": str(self.rank),
            "tau": json.dumps({str(layer): tau for layer, tau in self.thresholds.items()}),
            "default_layers": json.dumps(self.default_layers),
            "orientation_check": json.dumps(self.orientation),
            "tau_from": self.tau_from,
        }

    @classmethod
    def _from_parts(cls, by_layer, reader, **common):
        taus = reader.json("tau", dict)
        tau_from = reader.values.get("tau_from", "text")  # artifacts made before it was recorded
        if tau_from not in TAU_FROM:
            raise ArtifactError(
                f"metadata `tau_from` must be one of {', '.join(TAU_FROM)}, got {tau_from!r}", source=reader.source
            )
        try:
            thresholds = {int(layer): float(tau) for layer, tau in taus.items()}
        except (TypeError, ValueError):
            raise ArtifactError(
                f"metadata `tau` must map layer indices to numbers, got {taus}", source=reader.source
            ) from None
        artifact = cls(
            bases=by_layer,
            thresholds=thresholds,
            default_layers=reader.json("default_layers", list),
            orientation=reader.json("orientation_check", dict),
            tau_from=tau_from,
            **common,
        )
        rank = reader.integer("rank")
        if any(basis.dim() != 2 or basis.shape[0] != rank for basis in by_layer.values()):
            raise ArtifactError(f"every basis must have {rank} rows (metadata `rank`)", source=reader.source)
        return artifact

    def _validate(self, source):
        size = self.model.hidden_size
        for layer, basis in self.bases.items():
            if basis.shape[1] != size:
                raise ArtifactError(
                    f"tensor 'basis.{layer}' has shape {tuple(basis.shape)}, expected "
                    f"({self.rank}, {size}) for hidden size {size}",
                    source=source,
                )
            gram = basis.double() @ basis.double().T
            if not torch.allclose(gram, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-3):
                raise ArtifactError(f"tensor 'basis.{layer}' does not have orthonormal rows", source=source)
            if layer not in self.thresholds or not math.isfinite(self.thresholds[layer]):
                raise ArtifactError(f"metadata `tau` has no finite threshold for layer {layer}", source=source)
        self.check_layers(self.default_layers, what="metadata `default_layers`")
