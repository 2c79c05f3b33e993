"""VLM-Guard (arXiv 2502.10486), as docs/defenses/vlm_guard.md describes.

The language backbone, fed text only, teaches what "harmful" looks like: the safety
subspace ``V_l`` (top-m directions of harmful − harmless anchor differences, calibrated by
``vlm-safety calibrate vlm-guard``) at each steered layer. Two modes, and both in sequence:

- ``project_out`` (default, the mode the paper's abstract describes): ``h ← h − (h·Vᵀ)·V``
  at every steered position;
- ``gated_amplify``: at prefill a gate reads the gate layer's last-prompt state
  ``p``; when ``p·v1 > τ`` the row gets ``α·(h_l(q_last)·Vᵀ)·V`` added at every steered
  position of each layer, pushing a harmful request further to the refusal side;
- ``both``: project out, then amplify (the push is computed from the unedited prompt
  state, so the projection does not cancel it).

The report of each row says whether the gate fired and the projection ``p·v1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ...core.defense import Defense, EngineWork
from ...core.errors import ArtifactError, ConfigError
from ...core.options import Strength, option
from ...core.report import MODIFIED
from ...steering.interventions import SCOPE_DOC, SCOPES, AddPromptProjection, Gate, ProjectOut, check_engine_scope
from .artifact import SafetySubspace

MODES = ("project_out", "gated_amplify", "both")
GATED = ("gated_amplify", "both")
"""The modes with a gate (τ) and a push (α); ``project_out`` has neither."""


@dataclass(frozen=True)
class VlmGuardOptions:
    subspace: str = option(
        doc="Artifact from `vlm-safety calibrate vlm-guard` (a .safetensors path, relative to the working directory).",
        names_file=True,
    )
    mode: Literal[MODES] = option(
        "project_out",
        doc="`project_out`: remove the safety subspace (the paper's described mode); `gated_amplify`: push gated "
        "(harmful-looking) rows along their safety component; `both`: project out, then amplify.",
    )
    rank: int | None = option(
        None,
        doc="Directions m of the subspace to use (at most the artifact's rank); default: all of the artifact's.",
        min=1,
    )
    layers: list[int] | None = option(
        None,
        doc="Decoder layers to steer; default: the artifact's default band "
        "(the middle layers when calibrated on all layers).",
        min=0,
        min_items=1,
    )
    alpha: float = option(
        1.0, doc="Strength α of `gated_amplify` (the paper suggests 1 to 4); 0 turns it off.", min=0.0, max=100.0
    )
    tau: float | None = option(
        None, doc="Gate threshold on `p·v1` at the gate layer; default: the artifact's calibrated τ for that layer."
    )
    tau_shift: float = option(
        0.0,
        doc="Move the gate threshold by this many anchor gaps (the distance between the mean projections of the "
        "harmful and the harmless anchors τ was cut between, recorded per layer): below 0 the gate fires on more "
        "rows, above 0 on fewer. One value means the same on any artifact, which is why `vlm-safety tune` sweeps it.",
        min=-10.0,
        max=10.0,
    )
    gate_layer: int | None = option(
        None,
        doc="Layer whose last-prompt state decides the gate; default: the lowest "
        "steered layer (so every steered layer is steered from the last "
        "prompt token on).",
        min=0,
    )
    scope: Literal[SCOPES] = option("last_prompt_and_generated", doc=SCOPE_DOC)
    text_only: bool = option(
        False,
        doc="Also steer rows without an image. Off by default: text-only rows are where the backbone's own "
        "alignment holds, and projecting the safety subspace out of them removes the refusal direction.",
    )
    allow_other_weights: bool = option(
        False,
        doc="Accept an artifact calibrated on other weights of the same architecture (the calibrated weights "
        "rounded to another dtype, or with an adapter merged), or one that records no weights fingerprint. Off: such "
        "an artifact is refused before any generation.",
    )


@dataclass(frozen=True)
class _Settings:
    """The options resolved against the artifact: what both the transformers path and an engine steer."""

    layers: list[int]
    rank: int
    gate_layer: int
    tau: float
    amplify: bool

    @classmethod
    def of(cls, options: VlmGuardOptions, artifact: SafetySubspace) -> _Settings:
        """ArtifactError when the options ask for layers or a rank the artifact does not have."""
        layers = sorted(set(options.layers)) if options.layers is not None else list(artifact.default_layers)
        artifact.check_layers(layers, what="defenses.vlm_guard.layers")
        rank = artifact.rank if options.rank is None else options.rank
        if rank > artifact.rank:
            raise ArtifactError(
                f"defenses.vlm_guard.rank is {rank}, but the artifact has rank {artifact.rank}", source=artifact.path
            )
        gate_layer = min(layers) if options.gate_layer is None else options.gate_layer
        artifact.check_layers([gate_layer], what="defenses.vlm_guard.gate_layer")
        tau = artifact.thresholds[gate_layer] if options.tau is None else options.tau
        if options.tau_shift:
            tau += options.tau_shift * artifact.gate_gap(gate_layer)
        return cls(layers, rank, gate_layer, tau, options.mode in GATED and options.alpha > 0)

    def interventions(self, options, bases, direction, decide, rows) -> list:
        """The edits for one call: project out and/or a gated push, on ``rows`` (None: all)."""
        where = dict(scope=options.scope, rows=rows)
        interventions = []
        if options.mode in ("project_out", "both"):
            interventions.append(ProjectOut(bases, **where))
        if self.amplify:
            direction = direction.float()
            gate = Gate(self.gate_layer, lambda state: decide(state.float() @ direction.to(state.device)))
            interventions.append(AddPromptProjection(bases, alpha=options.alpha, gate=gate, **where))
        return interventions


class VlmGuard(Defense):
    """Removes, or amplifies on gated rows, the hidden states' part in the safety subspace."""

    name = "vlm_guard"
    Options = VlmGuardOptions
    description = "VLM-Guard: project out / gated amplify of the text-taught safety subspace (intervention)."
    strength = (  # τ moves in anchor gaps (tau_shift): absolute values would differ per artifact and layer
        Strength("mode", ("project_out", "gated_amplify", "both")),
        Strength("rank", (1, 2, 3, 5)),  # a rank past the artifact's is skipped, saying so
        Strength("tau_shift", (0.5, 0.0, -0.5, -1.0), refine=True, when={"mode": GATED}),
        Strength("alpha", (1.0, 2.0, 4.0), when={"mode": GATED}),
    )

    def __init__(self, options, resources):
        super().__init__(options, resources)
        self.artifact = SafetySubspace.load(options.subspace)
        self.settings = _Settings.of(options, self.artifact)
        self.layers, self.rank = self.settings.layers, self.settings.rank
        self.gate_layer, self.tau = self.settings.gate_layer, self.settings.tau

    @classmethod
    def engine_work(cls, options, artifacts):
        """Inside an inference engine: the same edits, the gate deciding ``p·v1 > τ`` per request."""
        check_engine_scope(options.scope, path="defenses.vlm_guard.scope")
        artifact = artifacts.get(options.subspace, SafetySubspace, option="defenses.vlm_guard.subspace")
        try:
            settings = _Settings.of(options, artifact)
        except ArtifactError as error:
            raise ConfigError(error.reason, path="defenses.vlm_guard") from None

        def steering(row):
            if not (options.text_only or row.has_image):
                return []
            bases = row.place(artifact, settings.layers, rows=settings.rank)
            direction = row.place(artifact, [settings.gate_layer], rows=1)[settings.gate_layer][0]
            return settings.interventions(options, bases, direction, lambda projection: projection > settings.tau, None)

        return EngineWork(steering=steering)

    @classmethod
    def conformance_options(cls, model, processor, workdir):
        from .anchors import vlm_guard_pairs
        from .calibration import calibrate_vlm_guard

        path = calibrate_vlm_guard(model, processor, vlm_guard_pairs()[0][:8], rank=2).save(
            Path(workdir) / "vlm_guard.safetensors"
        )
        return {
            "neutral": {"subspace": str(path), "mode": "gated_amplify", "alpha": 0.0},
            "active": {"subspace": str(path)},
        }

    def interventions(self, call):
        options = self.options
        allow = options.allow_other_weights
        bases = self.artifact.on_model(call.adapter, self.layers, rows=self.rank, allow_other_weights=allow)
        steered = [True] * call.batch_size if options.text_only else call.image_rows
        for record in self.records(call, ran=steered):
            record.details.update(mode=options.mode, layers=self.layers, rank=self.rank, alpha=options.alpha)
            if record.ran and options.mode != "gated_amplify":
                record.decision = MODIFIED
            if record.ran and self.settings.amplify:
                record.details.update(gate_layer=self.gate_layer, tau=self.tau)
        if not any(steered):
            return []
        placed = self.artifact.on_model(call.adapter, [self.gate_layer], rows=1, allow_other_weights=allow)
        direction = placed[self.gate_layer][0]
        rows = None if all(steered) else steered
        return self.settings.interventions(
            options, bases, direction, lambda projection: self._decide(call, steered, projection), rows
        )

    def _decide(self, call, steered: list[bool], projection: torch.Tensor) -> torch.Tensor:
        """The gate: ``p·v1 > τ`` per input row (the projection in float32); records each row's projection
        and decision."""
        fired = projection > self.tau
        for row, on in enumerate(steered):
            record = call.record(self.name, row)
            record.scores["projection"] = float(projection[row])
            record.details["gate_fired"] = on and bool(fired[row])
            if record.details["gate_fired"]:
                record.decision = MODIFIED
        return fired
