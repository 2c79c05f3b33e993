"""Read the residual stream: each decoder layer's state at the last prompt token.

CMRM and VLM-Guard compare requests by the residual stream at the last prompt token,
the one position that every view of a request (real image, corrupted image, text only)
shares. ``last_prompt_states`` runs one forward pass and keeps only that position of the
layers asked for, never the full sequences. It reads through the attached model's
intervention hooks (which act only in the caller's context, so concurrent generate calls
on the same model are undisturbed), or through hooks installed for the one pass when the
model is not attached.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Iterator, Sequence

import torch

from .interventions import Intervention, InterventionHooks


def last_prompt_states(
    model, adapter, inputs: dict, layers: Iterable[int], steering: Sequence[Intervention] = ()
) -> dict[int, torch.Tensor]:
    """Per layer, the layer's output at the last prompt position of each row (rows × d).

    ``inputs`` are left-padded model inputs (``adapter.build_inputs``), so the last prompt
    token is the last position of every row. States keep the model's device and dtype.
    ``steering``: interventions active in the pass; a layer's state is read as the layer
    produced it, so it carries the edits of the layers below, not its own.
    """
    layers = sorted({int(layer) for layer in layers})
    input_ids = inputs["input_ids"]
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(adapter.base_model)) else {}
    rows = input_ids.shape[0]
    with (
        _hooks(model, adapter) as hooks,
        torch.no_grad(),
        hooks.activate(steering, prompt_length=input_ids.shape[1], batch_size=rows, read=layers) as active,
    ):
        model(**inputs, use_cache=False, **extra)
    missing = [layer for layer in layers if layer not in active.prompt_states]
    if missing:
        raise RuntimeError(f"the forward pass never reached decoder layer {missing[0]}")
    return {layer: active.prompt_states[layer] for layer in layers}


@contextlib.contextmanager
def _hooks(model, adapter) -> Iterator[InterventionHooks]:
    """The attached model's hooks, else hooks on ``adapter``'s decoder layers for this block only."""
    from ..core.runtime import get_attachment

    attachment = get_attachment(model)
    if attachment is not None:
        yield attachment.hooks
        return
    hooks = InterventionHooks(adapter.decoder_layers(), adapter.hidden_size())
    try:
        yield hooks
    finally:
        hooks.remove()


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    """Whether the model computes logits for the last position only on request (saves the LM head)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
