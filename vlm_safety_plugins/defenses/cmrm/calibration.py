"""CMRM's modality shift and its dataset-level calibration.

Each batch of anchor questions is run twice, with a corrupted image (``blank`` or
``noise``, at the processor's input size) and text only; per layer
``v_l = mean_i[h_l(text-only) − h_l(corrupted)]`` at the last prompt token
(docs/defenses/cmrm.md). The anchors carry no real image: the dataset-level vector is
defined on the corrupted view, which is content-free by design. ``modality_shift`` is
also what sample-level CMRM runs per request at generation time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ...core.errors import ConfigError
from ...steering.artifacts import ModelIdentity
from ...steering.calibration import Progress, adapter_of, advance, batches, layer_indices, on_model, passes
from ...steering.interventions import AddVector, Intervention
from ...steering.readout import last_prompt_states
from .anchors import cmrm_anchors
from .artifact import CmrmVectors

CORRUPTIONS = ("blank", "noise")
CHECKED_ANCHORS = 128  # the direction check keeps this many per-anchor shifts in memory


def modality_shift(
    model,
    adapter,
    requests: Sequence[tuple[str, Image.Image]],
    layers: Sequence[int],
    *,
    corrupt: str = "blank",
    seed: int = 0,
    steering: Sequence[Intervention] = (),
) -> dict[int, torch.Tensor]:
    """Per layer, ``h(text-only) − h(corrupted image)`` at the last prompt token, one row per request.

    Two forward passes, each batched over the requests: every request with a corrupted image
    in place of its own (sized by the adapter's ``corruption_size``), then text only. Kept
    apart because the text-only prompts are far shorter (no image tokens to pad them to).
    ``steering`` is active in the corrupted-image pass (the rows CMRM steers) only.
    """
    if corrupt not in CORRUPTIONS:
        raise ValueError(f"corrupt must be one of {', '.join(CORRUPTIONS)}; got {corrupt!r}")
    corrupted_inputs = on_model(adapter, adapter.build_inputs(requests, image_mode=corrupt, seed=seed))
    corrupted = last_prompt_states(model, adapter, corrupted_inputs, layers, steering)
    text_only = last_prompt_states(
        model, adapter, on_model(adapter, adapter.build_inputs(requests, image_mode="none")), layers
    )
    return {layer: text_only[layer] - corrupted[layer] for layer in corrupted}


def calibrate_cmrm(
    model,
    processor,
    anchors: str | Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    corrupt: str = "blank",
    sequential: bool = False,
    alpha: float = 1.0,
    batch_size: int = 8,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> CmrmVectors:
    """CMRM's dataset-level shift vectors of ``model`` over ``anchors`` (a JSONL path, a list of
    questions, or None for the shipped set); ``layers`` default to every decoder layer.

    One-shot (the paper): every layer's vector from one unsteered pass. ``sequential``: layer
    by layer from the lowest, each vector measured with the layers below already steered by
    theirs at ``alpha`` (at the last prompt token), so a layer adds only the shift the layers
    below left; one-shot vectors overshoot when every layer is steered, since each also
    carries what the layers below already moved. Costs one corrupted-image pass per layer."""
    adapter = adapter_of(model, processor)
    texts, source = cmrm_anchors(anchors)
    layers = layer_indices(layers, adapter)
    if corrupt not in CORRUPTIONS:
        raise ConfigError(f"corrupt must be one of {', '.join(CORRUPTIONS)}; got {corrupt!r}")
    if not (0 < alpha <= 100):
        raise ConfigError(f"alpha must be in (0, 100]; got {alpha!r}")
    # Anchors have no image of their own; this stand-in only fixes the corrupted image's size.
    stand_in = adapter.corrupted_image("blank", size=adapter.image_size())
    chunks = [[(text, stand_in) for text in chunk] for chunk in batches(texts, batch_size)]
    stages = [[layer] for layer in sorted(layers)] if sequential else [layers]
    vectors: dict[int, torch.Tensor] = {}
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    progress = passes(progress, len(stages))
    for stage in stages:
        steering = [AddVector(dict(vectors), alpha=alpha, scope="last_prompt")] if vectors else []
        total = {layer: torch.zeros(adapter.hidden_size(), dtype=torch.float64) for layer in stage}
        for index, chunk in enumerate(chunks):
            shifts = modality_shift(model, adapter, chunk, stage, corrupt=corrupt, seed=index, steering=steering)
            for layer, shift in shifts.items():
                shift = shift.detach().to("cpu", torch.float64)
                total[layer] += shift.sum(dim=0)
                room = CHECKED_ANCHORS - sum(len(part) for part in kept[layer])
                if room > 0:
                    kept[layer].append(shift[:room])
            advance(progress, len(chunk))
        vectors.update({layer: (total[layer] / len(texts)).float() for layer in stage})
    vectors = {layer: vectors[layer] for layer in layers}
    closer = {layer: _fraction_moved_closer(torch.cat(kept[layer]), vectors[layer].double()) for layer in layers}
    # Passed: adding v brings most anchors' corrupted-image states closer to their text-only ones.
    orientation = {
        "passed": sum(closer.values()) / len(closer) > 0.5,
        "checked_anchors": min(len(texts), CHECKED_ANCHORS),
        "moved_closer": {str(layer): value for layer, value in closer.items()},
    }
    return CmrmVectors(
        model=ModelIdentity.of(adapter, model_name),
        anchors=len(texts),
        anchor_source=source,
        vectors=vectors,
        corruption=corrupt,
        alpha=alpha if sequential else 1.0,
        calibration="sequential" if sequential else "one_shot",
        orientation=orientation,
    )


def _fraction_moved_closer(shifts: torch.Tensor, vector: torch.Tensor) -> float:
    """Share of anchors whose corrupted-image state gets closer to its text-only state when ``vector``
    is added: ``|d − v| < |d|`` for each anchor's shift ``d``."""
    return float(((shifts - vector).norm(dim=1) < shifts.norm(dim=1)).double().mean())
