"""Residual-stream interventions: edit decoder-layer outputs during one generate call.

One forward hook per decoder layer is installed when a model is attached. The hooks read
the interventions of the *current call* from a context variable, so concurrent calls in
other threads never see each other's edits, and a call without interventions costs one
context-variable lookup per layer.

An intervention names its layers, a position scope, optional rows and an optional gate;
subclasses say how a hidden state changes (``AddVector``: additive; ``ProjectOut``:
remove a subspace). CMRM, VLM-Guard and their relatives are thin users of this module.

Position scopes count positions of the padded sequence the model sees: prompt positions
``0 .. P-1`` (left padding keeps the last prompt token at ``P-1`` in every row), then one
position per generated token.

- ``last_prompt_and_generated`` (default): the last prompt token and every generated one
- ``generated``: generated tokens only
- ``all``: every position, prompt included
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

SCOPES = ("last_prompt_and_generated", "generated", "all")


class Gate:
    """A per-row switch decided on the last prompt token's state at ``layer``.

    ``decide`` maps that state (rows × hidden) to a bool per row. Until the hook at
    ``layer`` has seen the last prompt token the gate is closed, so layers below
    ``layer`` are steered from the first generated token on.
    """

    def __init__(self, layer: int, decide: Callable[[torch.Tensor], torch.Tensor]):
        self.layer, self.decide = layer, decide


class Intervention:
    """Where to edit (layers, positions, rows, gate); subclasses define ``edit``."""

    def __init__(self, layers: Iterable[int], *, scope: str = "last_prompt_and_generated",
                 rows: torch.Tensor | Sequence[bool] | None = None, gate: Gate | None = None):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
        self.layers = frozenset(int(layer) for layer in layers)
        self.scope = scope
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
        self.gate = gate

    def check(self, hidden_size: int, batch_size: int) -> None:
        """Raise ValueError if this intervention's tensors do not fit the model and the batch."""
        if self.rows is not None and self.rows.shape != (batch_size,):
            raise ValueError(f"{type(self).__name__}: rows mask has shape {tuple(self.rows.shape)}, "
                             f"expected ({batch_size},) for a batch of {batch_size}")

    def edit(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The edited states for ``hidden`` (n × t × d); ``rows`` maps each of n to its input row."""
        raise NotImplementedError

    def first_position(self, prompt_length: int) -> int:
        """The first absolute position this intervention's scope covers."""
        return {"all": 0, "generated": prompt_length, "last_prompt_and_generated": prompt_length - 1}[self.scope]


class AddVector(Intervention):
    """``h ← h + α·v``: ``vectors[layer]`` is one vector (d) or one per input row (rows × d)."""

    def __init__(self, vectors: Mapping[int, torch.Tensor], *, alpha: float = 1.0, **where):
        super().__init__(vectors.keys(), **where)
        self.vectors = {int(layer): vector.detach() for layer, vector in vectors.items()}
        self.alpha = float(alpha)

    def check(self, hidden_size, batch_size):
        super().check(hidden_size, batch_size)
        for layer, vector in self.vectors.items():
            if vector.shape not in ((hidden_size,), (batch_size, hidden_size)):
                raise ValueError(f"AddVector: layer {layer} vector has shape {tuple(vector.shape)}, expected "
                                 f"({hidden_size},) or ({batch_size}, {hidden_size}) for this model and batch")

    def edit(self, layer, hidden, rows):
        vector = _like(self.vectors[layer], hidden)
        if vector.dim() == 2:
            vector = vector[rows][:, None, :]
        return hidden + self.alpha * vector


class ProjectOut(Intervention):
    """``h ← h − (h·Vᵀ)·V``: remove the span of the orthonormal rows of ``bases[layer]`` (m × d)."""

    def __init__(self, bases: Mapping[int, torch.Tensor], **where):
        super().__init__(bases.keys(), **where)
        self.bases = {int(layer): basis.detach() for layer, basis in bases.items()}

    def check(self, hidden_size, batch_size):
        super().check(hidden_size, batch_size)
        for layer, basis in self.bases.items():
            if basis.dim() != 2 or basis.shape[1] != hidden_size:
                raise ValueError(f"ProjectOut: layer {layer} basis has shape {tuple(basis.shape)}, "
                                 f"expected (m, {hidden_size}) for this model")

    def edit(self, layer, hidden, rows):
        basis = _like(self.bases[layer], hidden)
        return hidden - (hidden @ basis.T) @ basis


class ActiveInterventions:
    """The interventions of one generate call, with the positions each layer has seen so far."""

    def __init__(self, owner: object, interventions: Sequence[Intervention], *, prompt_length: int,
                 batch_size: int, start_position: int = 0, rows: Sequence[int] | None = None):
        self.owner = owner
        self.interventions = list(interventions)
        self.prompt_length, self.start_position = prompt_length, start_position
        self.rows = torch.arange(batch_size) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        self.seen: dict[int, int] = {}
        self.gate_open: dict[int, torch.Tensor] = {}

    def gate_fired(self, intervention: Intervention) -> torch.Tensor | None:
        """Per-row gate decisions (after prefill), or None if the gate has not been evaluated."""
        return self.gate_open.get(id(intervention))

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        start = self.seen.get(layer, self.start_position)
        length = hidden.shape[1]
        self.seen[layer] = start + length
        rows = self._row_index(hidden.shape[0], hidden.device)
        for intervention in self.interventions:
            self._maybe_decide_gate(intervention, layer, hidden, start)
            if layer not in intervention.layers:
                continue
            first = max(0, intervention.first_position(self.prompt_length) - start)
            if first >= length:
                continue
            keep = self._rows_to_edit(intervention, rows)
            if keep is not None and not bool(keep.any()):
                continue
            tail = hidden[:, first:]
            edited = intervention.edit(layer, tail, rows)
            if keep is not None:
                edited = torch.where(keep[:, None, None], edited, tail)
            hidden = edited if first == 0 else torch.cat([hidden[:, :first], edited], dim=1)
        return hidden

    def _row_index(self, n: int, device: torch.device) -> torch.Tensor:
        if n % len(self.rows):
            raise RuntimeError(f"decoder batch of {n} rows is not a multiple of the call's "
                               f"{len(self.rows)} input rows")
        return self.rows.to(device).repeat_interleave(n // len(self.rows))

    def _maybe_decide_gate(self, intervention, layer, hidden, start):
        gate = intervention.gate
        last = self.prompt_length - 1
        if gate is None or gate.layer != layer or id(intervention) in self.gate_open:
            return
        if start <= last < start + hidden.shape[1]:
            decided = torch.as_tensor(gate.decide(hidden[:, last - start]), dtype=torch.bool)
            self.gate_open[id(intervention)] = decided.to(hidden.device)

    def _rows_to_edit(self, intervention, rows):
        keep = None
        if intervention.rows is not None:
            keep = intervention.rows.to(rows.device)[rows]
        if intervention.gate is not None:
            gate = self.gate_open.get(id(intervention))
            if gate is None:
                return torch.zeros_like(rows, dtype=torch.bool)
            keep = gate if keep is None else keep & gate
        return keep


_ACTIVE: contextvars.ContextVar[ActiveInterventions | None] = contextvars.ContextVar(
    "vlm_safety_active_interventions", default=None)


class InterventionHooks:
    """One forward hook per decoder layer, installed once, acting only inside ``activate``."""

    def __init__(self, layers: Sequence[torch.nn.Module], hidden_size: int):
        self.num_layers, self.hidden_size = len(layers), hidden_size
        self._handles = [layer.register_forward_hook(functools.partial(self._hook, index))
                         for index, layer in enumerate(layers)]

    def _hook(self, index, module, args, output):
        active = _ACTIVE.get()
        if active is None or active.owner is not self:
            return None
        if isinstance(output, tuple):
            return (active(index, output[0]), *output[1:])
        return active(index, output)

    @contextlib.contextmanager
    def activate(self, interventions: Sequence[Intervention], *, prompt_length: int, batch_size: int,
                 start_position: int = 0, rows: Sequence[int] | None = None) -> Iterator[ActiveInterventions | None]:
        """Apply ``interventions`` to forward passes of this model in this context only.

        ``batch_size`` is the number of input rows the interventions were made for.
        ``start_position`` is the number of positions already in the KV cache when the
        first forward pass runs (0 for a fresh generate). ``rows``, for a generate that
        continues some of those rows (say N candidates of row 3: ``[3] * N``), gives the
        input row of each row of this generate; by default row i is input row i.
        """
        if not interventions:
            yield None
            return
        for intervention in interventions:
            bad = sorted(layer for layer in intervention.layers if not 0 <= layer < self.num_layers)
            if bad:
                raise ValueError(f"{type(intervention).__name__} targets layer {bad[0]}, "
                                 f"but the model has decoder layers 0..{self.num_layers - 1}")
            intervention.check(self.hidden_size, batch_size)
        state = ActiveInterventions(self, interventions, prompt_length=prompt_length, batch_size=batch_size,
                                    start_position=start_position, rows=rows)
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == reference.dtype and tensor.device == reference.device:
        return tensor
    return tensor.to(device=reference.device, dtype=reference.dtype)
