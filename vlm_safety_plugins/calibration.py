"""Calibration: CMRM shift vectors and VLM-Guard subspaces from forward passes over anchors.

Both read only the residual stream at the last prompt token of each decoder layer
(``readout.last_prompt_states``), in batches, so memory grows with anchors × layers ×
hidden size, never with sequence length.

- CMRM (ALGORITHMS.md §2): each batch of anchor questions is run twice, with a corrupted
  image (``blank`` or ``noise``, at the processor's input size) and text only;
  ``v_l = mean_i[h_l(text-only) − h_l(corrupted)]``. The anchors carry no real image: the
  dataset-level vector is defined on the corrupted view, which is content-free by design.
- VLM-Guard (ALGORITHMS.md §3): paired harmful / harmless instructions, text only;
  ``A_l`` stacks their differences, the top-``rank`` right singular vectors of ``A_l`` span
  the safety subspace, the first is oriented so that harmful anchors project higher, and
  the gate threshold τ_l is the cut on that projection that best separates the anchors.

``modality_shift`` is also what sample-level CMRM runs per request at generation time.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from . import anchors as anchor_sets
from .artifacts import CmrmVectors, ModelIdentity, SafetySubspace
from .errors import ConfigError
from .readout import last_prompt_states

DEFAULT_RANK = 5
CORRUPTIONS = ("blank", "noise")
CHECKED_ANCHORS = 128  # CMRM's direction check keeps this many per-anchor shifts in memory

Progress = Callable[[int], None]


def middle_layers(num_layers: int) -> list[int]:
    """VLM-Guard's default band of layers: ⌊5L/16⌋ .. ⌊5L/8⌋ (10..20 of a 32-layer model)."""
    return list(range(5 * num_layers // 16, 5 * num_layers // 8 + 1))


def modality_shift(model, adapter, requests: Sequence[tuple[str, Image.Image]], layers: Sequence[int], *,
                   corrupt: str = "blank", seed: int = 0) -> dict[int, torch.Tensor]:
    """Per layer, ``h(text-only) − h(corrupted image)`` at the last prompt token, one row per request.

    Two forward passes, each batched over the requests: every request with a corrupted image
    in place of its own (sized by the adapter's ``corruption_size``), then text only. Kept
    apart because the text-only prompts are far shorter (no image tokens to pad them to).
    """
    if corrupt not in CORRUPTIONS:
        raise ValueError(f"corrupt must be one of {', '.join(CORRUPTIONS)}; got {corrupt!r}")
    corrupted = last_prompt_states(model, adapter, _on_model(
        adapter, adapter.build_inputs(requests, image_mode=corrupt, seed=seed)), layers)
    text_only = last_prompt_states(model, adapter, _on_model(
        adapter, adapter.build_inputs(requests, image_mode="none")), layers)
    return {layer: text_only[layer] - corrupted[layer] for layer in corrupted}


def calibrate_cmrm(model, processor, anchors: str | Sequence[str] | None = None, *, layers: Sequence[int] | None = None,
                   corrupt: str = "blank", batch_size: int = 8, model_name: str | None = None,
                   progress: Progress | None = None) -> CmrmVectors:
    """CMRM's dataset-level shift vectors of ``model`` over ``anchors`` (a JSONL path, a list of
    questions, or None for the shipped set); ``layers`` default to every decoder layer."""
    adapter = _adapter(model, processor)
    texts, source = anchor_sets.cmrm_anchors(anchors)
    layers = _layers(layers, adapter)
    if corrupt not in CORRUPTIONS:
        raise ConfigError(f"corrupt must be one of {', '.join(CORRUPTIONS)}; got {corrupt!r}")
    # Anchors have no image of their own; this stand-in only fixes the corrupted image's size.
    stand_in = adapter.corrupted_image("blank", size=adapter.image_size())
    total = {layer: torch.zeros(adapter.hidden_size(), dtype=torch.float64) for layer in layers}
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for index, chunk in enumerate(_batches(texts, batch_size)):
        shifts = modality_shift(model, adapter, [(text, stand_in) for text in chunk], layers, corrupt=corrupt,
                                seed=index)
        for layer, shift in shifts.items():
            shift = shift.detach().to("cpu", torch.float64)
            total[layer] += shift.sum(dim=0)
            room = CHECKED_ANCHORS - sum(len(part) for part in kept[layer])
            if room > 0:
                kept[layer].append(shift[:room])
        _advance(progress, len(chunk))
    vectors = {layer: (total[layer] / len(texts)).float() for layer in layers}
    closer = {layer: _fraction_moved_closer(torch.cat(kept[layer]), vectors[layer].double()) for layer in layers}
    # Passed: adding v brings most anchors' corrupted-image states closer to their text-only ones.
    orientation = {"passed": sum(closer.values()) / len(closer) > 0.5, "checked_anchors": min(
        len(texts), CHECKED_ANCHORS), "moved_closer": {str(layer): value for layer, value in closer.items()}}
    return CmrmVectors(model=ModelIdentity.of(adapter, model_name), anchors=len(texts), anchor_source=source,
                       vectors=vectors, corruption=corrupt, alpha=1.0, orientation=orientation)


def calibrate_vlm_guard(model, processor, pairs: str | Sequence[tuple[str, str]] | None = None, *,
                        layers: Sequence[int] | None = None, rank: int = DEFAULT_RANK, batch_size: int = 8,
                        model_name: str | None = None, progress: Progress | None = None) -> SafetySubspace:
    """VLM-Guard's safety subspaces of ``model`` over harmful / harmless ``pairs`` (a JSONL path,
    a list, or None for the shipped set); ``layers`` default to every decoder layer, and the
    defense's default band to the middle layers."""
    adapter = _adapter(model, processor)
    pairs, source = anchor_sets.vlm_guard_pairs(pairs)
    chosen = _layers(layers, adapter)
    if not 1 <= rank <= min(len(pairs), adapter.hidden_size()):
        raise ConfigError(f"rank must be between 1 and min(anchor pairs, hidden size) = "
                          f"{min(len(pairs), adapter.hidden_size())}; got {rank}")
    harmful: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    harmless: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    for chunk in _batches(pairs, batch_size):
        requests = [(bad, None) for bad, _ in chunk] + [(good, None) for _, good in chunk]
        states = last_prompt_states(model, adapter, _on_model(adapter, adapter.build_inputs(requests)), chosen)
        for layer, state in states.items():
            state = state.detach().to("cpu", torch.float32)
            harmful[layer].append(state[:len(chunk)])
            harmless[layer].append(state[len(chunk):])
        _advance(progress, len(chunk))
    bases, thresholds, checks = {}, {}, {}
    for layer in chosen:
        bases[layer], thresholds[layer], checks[layer] = _subspace(torch.cat(harmful[layer]).double(),
                                                                   torch.cat(harmless[layer]).double(), rank)
    band = [layer for layer in middle_layers(len(adapter.decoder_layers())) if layer in chosen]
    default_layers = band if layers is None and band else chosen
    orientation = {"passed": all(check["mean_gap"] > 0 for check in checks.values()),
                   "per_layer": {str(layer): check for layer, check in checks.items()}}
    return SafetySubspace(model=ModelIdentity.of(adapter, model_name), anchors=len(pairs), anchor_source=source,
                          bases=bases, thresholds=thresholds, default_layers=default_layers, orientation=orientation)


def _subspace(harmful: torch.Tensor, harmless: torch.Tensor, rank: int) -> tuple[torch.Tensor, float, dict]:
    """(oriented basis rank × d, gate threshold τ, check figures) of one layer's anchor states."""
    differences = harmful - harmless
    _, _, right = torch.linalg.svd(differences, full_matrices=False)
    basis = right[:rank].clone()
    if float(differences.mean(dim=0) @ basis[0]) < 0:  # SVD signs are arbitrary: harmful must project higher
        basis[0] = -basis[0]
    high, low = harmful @ basis[0], harmless @ basis[0]
    tau, accuracy = _best_threshold(high, low)
    check = {"mean_gap": float(high.mean() - low.mean()), "pair_accuracy": float((high > low).double().mean()),
             "gate_accuracy": accuracy}
    return basis.float(), tau, check


def _best_threshold(high: torch.Tensor, low: torch.Tensor) -> tuple[float, float]:
    """The cut τ (fire when score > τ) with the best balanced accuracy; among ties, the middle one."""
    values = torch.unique(torch.cat([high, low]))
    candidates = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    accuracy = ((high[None, :] > candidates[:, None]).double().mean(dim=1)
                + (low[None, :] <= candidates[:, None]).double().mean(dim=1)) / 2
    best = (accuracy == accuracy.max()).nonzero().flatten()
    choice = int(best[len(best) // 2])
    return float(candidates[choice]), float(accuracy[choice])


def _fraction_moved_closer(shifts: torch.Tensor, vector: torch.Tensor) -> float:
    """Share of anchors whose corrupted-image state gets closer to its text-only state when ``vector``
    is added: ``|d − v| < |d|`` for each anchor's shift ``d``."""
    return float(((shifts - vector).norm(dim=1) < shifts.norm(dim=1)).double().mean())


def _adapter(model, processor):
    from .adapters import find_adapter
    from .runtime import get_attachment

    attachment = get_attachment(model)
    return attachment.adapter if attachment is not None else find_adapter(model, processor)


def _layers(layers: Sequence[int] | None, adapter) -> list[int]:
    count = len(adapter.decoder_layers())
    if layers is None:
        return list(range(count))
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < count]
    if not chosen or bad:
        raise ConfigError(f"layers must be decoder layer indices in 0..{count - 1}; got {list(layers)}")
    return chosen


def _on_model(adapter, inputs):
    """``inputs`` on the model's device, floating-point tensors in its dtype."""
    model = adapter.base_model
    return {name: value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)
            for name, value in inputs.items()}


def _batches(items: Sequence, size: int):
    if size < 1:
        raise ConfigError(f"batch size must be at least 1; got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _advance(progress: Progress | None, count: int) -> None:
    if progress is not None:
        progress(count)
