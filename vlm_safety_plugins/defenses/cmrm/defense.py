"""CMRM: Cross-Modality Representation Manipulation (arXiv 2410.09047), as docs/defenses/cmrm.md describes.

An image shifts the hidden states away from the text-only distribution where the
backbone's safety alignment lives. CMRM estimates that shift at each decoder layer as
``v_l = h_l(text-only) − h_l(corrupted image)`` at the last prompt token and adds
``α·v_l`` back, on rows that carry an image only:

- ``level: dataset``: ``v_l`` is the mean over an anchor set, computed once by
  ``vlm-safety calibrate cmrm`` and loaded from a safetensors artifact;
- ``level: sample``: ``v_l`` is computed per request from two extra prefill passes
  before generation, each batched over the call's image rows: corrupted image, then text
  only. Both views are rebuilt from the row's last user turn through the chat template.

The shift points from the image-conditioned states towards the text-only ones by
construction (the paper's equations disagree on the sign; the tests check the direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ...core.defense import Defense, EngineWork
from ...core.errors import ArtifactError, ConfigError, DefenseError
from ...core.options import Strength, option
from ...core.report import MODIFIED
from ...steering.interventions import SCOPE_DOC, SCOPES, AddVector, check_engine_scope
from .artifact import CmrmVectors
from .calibration import CORRUPTIONS, modality_shift

DEFAULT_ALPHA = {"dataset": 1.0, "sample": 0.5}


@dataclass(frozen=True)
class CmrmOptions:
    vectors: str | None = option(
        None,
        doc="Dataset-level artifact from `vlm-safety calibrate cmrm` (a .safetensors "
        "path, relative to the working directory); required for `level: dataset`.",
        names_file=True,
    )
    level: Literal["dataset", "sample"] = option(
        "dataset",
        doc="`dataset`: the artifact's vectors; `sample`: per request, from two extra prefill passes "
        "(corrupted image and text only).",
    )
    alpha: float | None = option(
        None,
        doc="Strength α of `h ← h + α·v`; default 1.0 at dataset level, 0.5 at sample "
        "level. 0 is exactly the undefended model.",
        min=0.0,
        max=100.0,
    )
    layers: list[int] | None = option(
        None,
        doc="Decoder layers to steer; default: every layer of the artifact (dataset) or of the model (sample).",
        min=0,
        min_items=1,
    )
    scope: Literal[SCOPES] = option("last_prompt_and_generated", doc=SCOPE_DOC)
    corrupt: Literal[CORRUPTIONS] | None = option(
        None,
        doc="The corrupted image: `blank` (grey) or `noise`. Sample level: default `blank`; dataset level: "
        "fixed by the artifact, an explicit value must match it.",
    )
    allow_other_weights: bool = option(
        False,
        doc="Accept an artifact calibrated on other weights of the same architecture (the calibrated weights "
        "rounded to another dtype, or with an adapter merged), or one that records no weights fingerprint. Off: such "
        "an artifact is refused before any generation.",
    )

    def __post_init__(self):
        if self.level == "dataset" and self.vectors is None:
            raise ConfigError(
                "required for `level: dataset` (make an artifact with `vlm-safety calibrate cmrm`), "
                "or set `level: sample`",
                path="vectors",
            )
        if self.level == "sample" and self.vectors is not None:
            raise ConfigError(
                "only for `level: dataset`; sample-level vectors are computed per request", path="vectors"
            )


def _alpha(options: CmrmOptions) -> float:
    return DEFAULT_ALPHA[options.level] if options.alpha is None else options.alpha


def _check_artifact(options: CmrmOptions, artifact: CmrmVectors) -> None:
    """The options' layers and corruption fit the dataset-level artifact; ArtifactError otherwise."""
    if options.layers is not None:
        artifact.check_layers(options.layers, what="defenses.cmrm.layers")
    if options.corrupt not in (None, artifact.corruption):
        raise ArtifactError(
            f"defenses.cmrm.corrupt is {options.corrupt!r}, but the artifact was computed "
            f"with {artifact.corruption!r} images",
            source=artifact.path,
        )


class Cmrm(Defense):
    """Steers image rows' hidden states back towards their text-only counterparts."""

    name = "cmrm"
    Options = CmrmOptions
    description = "CMRM: adds the image-to-text-only shift back to image rows' hidden states (intervention)."
    strength = (
        Strength(
            "alpha",
            (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
            refine=True,
            doc="α switches sharply: on the testbed 39 → 2 unsafe of 78 between 0.35 and 0.4",
        ),
    )

    def __init__(self, options, resources):
        super().__init__(options, resources)
        self.alpha = _alpha(options)
        self.artifact = None
        self.corrupt = options.corrupt or "blank"
        if options.level == "dataset":
            self.artifact = CmrmVectors.load(options.vectors)
            _check_artifact(options, self.artifact)
            self.corrupt = self.artifact.corruption

    @classmethod
    def engine_work(cls, options, artifacts):
        """Inside an inference engine: dataset level, the artifact's vectors added on image rows."""
        if options.level == "sample":
            raise ConfigError(
                "sample-level CMRM needs two extra prefill passes per request, which the inference engine "
                "does not run; use `level: dataset` with an artifact from `vlm-safety calibrate cmrm`",
                path="defenses.cmrm.level",
            )
        check_engine_scope(options.scope, path="defenses.cmrm.scope")
        artifact = artifacts.get(options.vectors, CmrmVectors, option="defenses.cmrm.vectors")
        try:
            _check_artifact(options, artifact)
        except ArtifactError as error:
            raise ConfigError(error.reason, path="defenses.cmrm") from None
        alpha, layers = _alpha(options), sorted(set(options.layers or artifact.layers))

        def steering(row):
            if alpha == 0 or not row.has_image:
                return []
            return [AddVector(row.place(artifact, layers), alpha=alpha, scope=options.scope)]

        return EngineWork(steering=steering)

    @classmethod
    def conformance_options(cls, model, processor, workdir):
        from .anchors import cmrm_anchors
        from .calibration import calibrate_cmrm

        texts = cmrm_anchors()[0]
        path = calibrate_cmrm(model, processor, texts[:4] + texts[-4:]).save(Path(workdir) / "cmrm.safetensors")
        return {"neutral": {"vectors": str(path), "alpha": 0.0}, "active": {"vectors": str(path), "alpha": 1.0}}

    def interventions(self, call):
        image_rows = call.image_rows
        layers = self._layers(call)
        applied = self.alpha > 0
        for record in self.records(call, ran=image_rows):
            record.details.update(
                level=self.options.level, alpha=self.alpha, layers=layers, applied=record.ran and applied
            )
            if record.ran and applied:
                record.decision = MODIFIED
        if not applied or not any(image_rows):
            return []
        if self.artifact is not None:
            vectors = self.artifact.on_model(call.adapter, layers, allow_other_weights=self.options.allow_other_weights)
        else:
            vectors = self._sample_vectors(call, image_rows, layers)
        return [
            AddVector(vectors, alpha=self.alpha, scope=self.options.scope, rows=None if all(image_rows) else image_rows)
        ]

    def _layers(self, call) -> list[int]:
        if self.options.layers is not None:
            return sorted(set(self.options.layers))
        return self.artifact.layers if self.artifact is not None else list(range(len(call.adapter.decoder_layers())))

    def _sample_vectors(self, call, image_rows: list[bool], layers: list[int]) -> dict[int, torch.Tensor]:
        """Per layer, one shift vector per row (zero for text-only rows), from two extra prefill passes.

        The runtime asks a defense for its interventions once per call, so ETA's continuations
        and other inner generates reuse these vectors.
        """
        image_row_indices = [row for row, has_image in enumerate(image_rows) if has_image]
        requests = [
            (call.adapter.user_text(call.inputs["input_ids"][row]), self._image(call, row)) for row in image_row_indices
        ]
        shifts = modality_shift(call.model, call.adapter, requests, layers, corrupt=self.corrupt)
        steered = torch.tensor(image_rows)
        vectors = {}
        for layer, shift in shifts.items():
            vectors[layer] = shift.new_zeros(call.batch_size, shift.shape[-1])
            vectors[layer][steered.to(shift.device)] = shift
        norms = torch.stack([shift.float().norm(dim=1) for shift in shifts.values()]).mean(dim=0).tolist()
        for row, norm in zip(image_row_indices, norms):
            call.record(self.name, row).details["vector_norm"] = norm
        return vectors

    @staticmethod
    def _image(call, row: int):
        images = call.images[row]
        if len(images) != 1:
            raise DefenseError(
                f"row {row}: sample-level CMRM needs exactly one image per image row, got "
                f"{len(images)} (pass images= to generate, one per row)"
            )
        return images[0]
