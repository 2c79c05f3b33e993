"""VLM-Guard's calibration: safety subspaces, their orientation and gate thresholds.

Paired harmful / harmless instructions run text only; per layer ``A_l`` stacks their
differences at the last prompt token, the top-``rank`` right singular vectors of ``A_l``
span the safety subspace, the first is oriented so that harmful anchors project higher,
and the gate threshold τ_l is the cut on that projection that best separates the anchors
(docs/defenses/vlm_guard.md). With ``tau_from="image"`` τ_l separates the same pairs asked
with a corrupted image (content-free, as CMRM's), the view the gate meets on image requests:
an image shifts the projection more than harmfulness does, so a text-taught τ fires on most
image rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.errors import ConfigError
from ...steering.artifacts import ModelIdentity
from ...steering.calibration import Progress, adapter_of, advance, batches, layer_indices, on_model, passes
from ...steering.readout import last_prompt_states
from .anchors import vlm_guard_pairs
from .artifact import TAU_FROM, SafetySubspace

DEFAULT_RANK = 5


def middle_layers(num_layers: int) -> list[int]:
    """VLM-Guard's default band of layers: ⌊5L/16⌋ .. ⌊5L/8⌋ (10..20 of a 32-layer model)."""
    return list(range(5 * num_layers // 16, 5 * num_layers // 8 + 1))


def calibrate_vlm_guard(
    model,
    processor,
    pairs: str | Sequence[tuple[str, str]] | None = None,
    *,
    layers: Sequence[int] | None = None,
    rank: int = DEFAULT_RANK,
    tau_from: str = "text",
    batch_size: int = 8,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> SafetySubspace:
    """VLM-Guard's safety subspaces of ``model`` over harmful / harmless ``pairs`` (a JSONL path,
    a list, or None for the shipped set); ``layers`` default to every decoder layer, and the
    defense's default band to the middle layers."""
    adapter = adapter_of(model, processor)
    pairs, source = vlm_guard_pairs(pairs)
    chosen = layer_indices(layers, adapter)
    if not 1 <= rank <= min(len(pairs), adapter.hidden_size()):
        raise ConfigError(
            f"rank must be between 1 and min(anchor pairs, hidden size) = "
            f"{min(len(pairs), adapter.hidden_size())}; got {rank}"
        )
    if tau_from not in TAU_FROM:
        raise ConfigError(f"tau_from must be one of {', '.join(TAU_FROM)}; got {tau_from!r}")
    progress = passes(progress, 2 if tau_from == "image" else 1)
    text = _pair_states(model, adapter, pairs, chosen, batch_size, None, progress)
    gate = text
    if tau_from == "image":
        corrupted = adapter.corrupted_image("blank", size=adapter.image_size())
        gate = _pair_states(model, adapter, pairs, chosen, batch_size, corrupted, progress)
    bases, thresholds, checks = {}, {}, {}
    for layer in chosen:
        bases[layer], thresholds[layer], checks[layer] = _subspace(*text[layer], rank, gate=gate[layer])
    band = [layer for layer in middle_layers(len(adapter.decoder_layers())) if layer in chosen]
    default_layers = band if layers is None and band else chosen
    orientation = {
        "passed": all(check["mean_gap"] > 0 for check in checks.values()),
        "per_layer": {str(layer): check for layer, check in checks.items()},
    }
    return SafetySubspace(
        model=ModelIdentity.of(adapter, model_name),
        anchors=len(pairs),
        anchor_source=source,
        bases=bases,
        thresholds=thresholds,
        default_layers=default_layers,
        orientation=orientation,
        tau_from=tau_from,
    )


def _pair_states(model, adapter, pairs, layers, batch_size, image, progress) -> dict[int, tuple]:
    """Per layer, (harmful, harmless) last-prompt states (pairs × d, float64) of the pairs asked with ``image``."""
    harmful: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    harmless: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for chunk in batches(pairs, batch_size):
        requests = [(bad, image) for bad, _ in chunk] + [(good, image) for _, good in chunk]
        states = last_prompt_states(model, adapter, on_model(adapter, adapter.build_inputs(requests)), layers)
        for layer, state in states.items():
            state = state.detach().to("cpu", torch.float64)
            harmful[layer].append(state[: len(chunk)])
            harmless[layer].append(state[len(chunk) :])
        advance(progress, len(chunk))
    return {layer: (torch.cat(harmful[layer]), torch.cat(harmless[layer])) for layer in layers}


def _subspace(harmful: torch.Tensor, harmless: torch.Tensor, rank: int, *, gate: tuple) -> tuple:
    """(oriented basis rank × d, gate threshold τ, check figures) of one layer's anchor states; τ is
    the best cut between the ``gate`` states' (harmful, harmless) projections on the first direction."""
    differences = harmful - harmless
    _, _, right = torch.linalg.svd(differences, full_matrices=False)
    basis = right[:rank].clone()
    if float(differences.mean(dim=0) @ basis[0]) < 0:  # SVD signs are arbitrary: harmful must project higher
        basis[0] = -basis[0]
    high, low = harmful @ basis[0], harmless @ basis[0]
    gate_high, gate_low = gate[0] @ basis[0], gate[1] @ basis[0]
    tau, accuracy = best_threshold(gate_high, gate_low)
    check = {
        "mean_gap": float(high.mean() - low.mean()),
        "gate_gap": float(gate_high.mean() - gate_low.mean()),
        "pair_accuracy": float((high > low).double().mean()),
        "gate_accuracy": accuracy,
    }
    return basis.float(), tau, check


def best_threshold(high: torch.Tensor, low: torch.Tensor) -> tuple[float, float]:
    """The cut τ (fire when score > τ) with the best balanced accuracy; among ties, the middle one."""
    values = torch.unique(torch.cat([high, low]))
    candidates = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1])
    accuracy = (
        (high[None, :] > candidates[:, None]).double().mean(dim=1)
        + (low[None, :] <= candidates[:, None]).double().mean(dim=1)
    ) / 2
    best = (accuracy == accuracy.max()).nonzero().flatten()
    choice = int(best[len(best) // 2])
    return float(candidates[choice]), float(accuracy[choice])
