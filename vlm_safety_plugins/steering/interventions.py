"""Residual-stream interventions: edit decoder-layer outputs during one generate call.

One forward hook per decoder layer is installed when a model is attached. The hooks read
the interventions of the *current call* from a context variable, so concurrent calls in
other threads never see each other's edits, and a call without interventions costs one
context-variable lookup per layer.

An intervention names its layers, a position scope, optional rows and an optional gate;
subclasses say how a hidden state changes (``AddVector``: additive; ``ProjectOut``:
remove a subspace; ``AddPromptProjection``: add what the prompt's last state has inside
a subspace). CMRM, VLM-Guard and their relatives are thin users of this module.

Gates and prompt-derived edits read the *last prompt token's* state at a layer as the
layer produced it, before any intervention of the call edits that layer, so the order
of interventions in a call does not change what they read. ``activate(read=...)``
records those states for a plain forward pass (a read-out without edits).

Position scopes count positions of the padded sequence the model sees: prompt positions
``0 .. P-1`` (left padding keeps the last prompt token at ``P-1`` in every row), then one
position per generated token.

- ``last_prompt_and_generated`` (default): the last prompt token and every generated one
- ``generated``: generated tokens only
- ``all``: every position, prompt included
- ``last_prompt``: the last prompt token only (it steers how the answer opens; generated
  tokens still read the prompt's other positions, the image among them, unedited)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

SCOPES = ("last_prompt_and_generated", "generated", "all", "last_prompt")
SCOPE_DOC = (
    "Positions to steer: the last prompt token and every generated one, generated only, all, or the last "
    "prompt token only (where the vectors are measured: it moves how the answer opens and leaves the "
    "image to the rest of it)."
)


def check_engine_scope(scope: str, *, path: str) -> None:
    """Inside an inference engine, a scope that edits prompt positions before the last is refused:
    with prefix caching, those positions' KV may come from a request steered otherwise."""
    from ..core.errors import ConfigError

    if scope == "all":
        raise ConfigError(
            "`scope: all` cannot run inside the inference engine: prefix caching may reuse prompt KV "
            "computed without this steering; use `last_prompt_and_generated`, `generated` or `last_prompt`",
            path=path,
        )


class Gate:
    """A per-row switch decided on the last prompt token's state at ``layer``.

    ``decide`` maps that state (input rows × hidden) to a bool per input row; beams and
    other copies of a row follow their row. Until the hook at ``layer`` has seen the last
    prompt token the gate is closed, so layers below ``layer`` are steered from the first
    generated token on.
    """

    def __init__(self, layer: int, decide: Callable[[torch.Tensor], torch.Tensor]):
        self.layer, self.decide = layer, decide


class Intervention:
    """Where to edit (layers, positions, rows, gate); subclasses define ``edit``.

    A subclass that sets ``reads_prompt_state`` derives per-call data from the last prompt
    token's state at each of its layers (``derive``, called once per layer and call, when
    that state passes) and receives it as ``edit(..., derived=...)``. Before that state
    has passed (a generate continuing from a cache), such an intervention does not edit.
    """

    reads_prompt_state: ClassVar[bool] = False

    def __init__(
        self,
        layers: Iterable[int],
        *,
        scope: str = "last_prompt_and_generated",
        rows: torch.Tensor | Sequence[bool] | None = None,
        gate: Gate | None = None,
    ):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
        self.layers = frozenset(int(layer) for layer in layers)
        self.scope = scope
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.bool)
        self.gate = gate

    def check(self, hidden_size: int, batch_size: int) -> None:
        """Raise ValueError if this intervention's tensors do not fit the model and the batch."""
        if self.rows is not None and self.rows.shape != (batch_size,):
            raise ValueError(
                f"{type(self).__name__}: rows mask has shape {tuple(self.rows.shape)}, "
                f"expected ({batch_size},) for a batch of {batch_size}"
            )

    def edit(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The edited states for ``hidden`` (n × t × d); ``rows`` maps each of n to its input row."""
        raise NotImplementedError

    def derive(self, layer: int, prompt_state: torch.Tensor) -> Any:
        """Per-call data for ``edit`` from the last prompt token's state (input rows × d)."""
        raise NotImplementedError(f"{type(self).__name__} sets reads_prompt_state but does not define derive")

    def positions(self, prompt_length: int) -> tuple[int, int | None]:
        """The absolute positions this intervention's scope covers: (first, end), end None = no end."""
        last = prompt_length - 1
        return {
            "all": (0, None),
            "generated": (prompt_length, None),
            "last_prompt_and_generated": (last, None),
            "last_prompt": (last, prompt_length),
        }[self.scope]


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
                raise ValueError(
                    f"AddVector: layer {layer} vector has shape {tuple(vector.shape)}, expected "
                    f"({hidden_size},) or ({batch_size}, {hidden_size}) for this model and batch"
                )

    def edit(self, layer, hidden, rows):
        vector = _like(self.vectors[layer], hidden)
        if vector.dim() == 2:
            vector = vector[rows][:, None, :]
        return torch.add(hidden, vector, alpha=self.alpha)


class SubspaceIntervention(Intervention):
    """Base of the edits defined by a subspace: ``bases[layer]`` has orthonormal rows (m × d)."""

    def __init__(self, bases: Mapping[int, torch.Tensor], **where):
        super().__init__(bases.keys(), **where)
        self.bases = {int(layer): basis.detach() for layer, basis in bases.items()}

    def check(self, hidden_size, batch_size):
        super().check(hidden_size, batch_size)
        for layer, basis in self.bases.items():
            if basis.dim() != 2 or basis.shape[1] != hidden_size:
                raise ValueError(
                    f"{type(self).__name__}: layer {layer} basis has shape {tuple(basis.shape)}, "
                    f"expected (m, {hidden_size}) for this model"
                )


class ProjectOut(SubspaceIntervention):
    """``h ← h − (h·Vᵀ)·V``: remove the span of the orthonormal rows of ``bases[layer]`` (m × d)."""

    def edit(self, layer, hidden, rows):
        basis = _like(self.bases[layer], hidden)
        return hidden - (hidden @ basis.T) @ basis


class AddPromptProjection(SubspaceIntervention):
    """``h ← h + α·(p·Vᵀ)·V``: push every edited position along the prompt's part in a subspace.

    ``p`` is the row's last-prompt-token state at that layer (as the layer produced it),
    ``V`` the orthonormal rows of ``bases[layer]`` (m × d). The added vector is computed
    once per row and layer, when the prompt's last token passes, so each following
    position gets the same push (VLM-Guard's ``gated_amplify``, usually with a ``Gate``),
    e.g. ``AddPromptProjection({12: V}, alpha=2.0, gate=Gate(12, lambda p: p @ V[0] > tau))``.
    """

    reads_prompt_state = True

    def __init__(self, bases: Mapping[int, torch.Tensor], *, alpha: float = 1.0, **where):
        super().__init__(bases, **where)
        self.alpha = float(alpha)

    def derive(self, layer, prompt_state):
        basis = _like(self.bases[layer], prompt_state)
        return self.alpha * (prompt_state @ basis.T) @ basis

    def edit(self, layer, hidden, rows, *, derived):
        return hidden + derived[rows][:, None, :]


class ActiveInterventions:
    """The interventions of one generate call, with the positions each layer has seen so far.

    ``prompt_states[layer]`` is the last prompt token's state at ``layer`` (input rows × d,
    as the layer produced it) once it has passed, for every layer something reads: a gate,
    an intervention with ``reads_prompt_state``, or ``read``.
    """

    def __init__(
        self,
        owner: object,
        interventions: Sequence[Intervention],
        *,
        prompt_length: int,
        batch_size: int,
        start_position: int = 0,
        rows: Sequence[int] | None = None,
        read: Iterable[int] = (),
        inherit: ActiveInterventions | None = None,
    ):
        self.owner = owner
        self.interventions = list(interventions)
        self.prompt_length, self.start_position, self.batch_size = prompt_length, start_position, batch_size
        self.rows = torch.arange(batch_size) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        self.seen: dict[int, int] = {}
        self.gate_open: dict[int, torch.Tensor] = dict(inherit.gate_open) if inherit else {}
        self.prompt_states: dict[int, torch.Tensor] = dict(inherit.prompt_states) if inherit else {}
        self.derived: dict[tuple[int, int], Any] = dict(inherit.derived) if inherit else {}
        self._read_layers = {int(layer) for layer in read}
        for intervention in self.interventions:
            if intervention.gate is not None:
                self._read_layers.add(intervention.gate.layer)
            if intervention.reads_prompt_state:
                self._read_layers.update(intervention.layers)
        self.layers = frozenset(self._read_layers.union(*(i.layers for i in self.interventions)))
        """Every layer these interventions edit or read: a hook on any other has nothing to do."""
        self._positions = {
            id(intervention): intervention.positions(prompt_length) for intervention in self.interventions
        }
        self.first_position = {  # layer -> the first position it edits or reads: nothing before it matters
            layer: min(
                [self._positions[id(i)][0] for i in self.interventions if layer in i.layers]
                + ([prompt_length - 1] if layer in self._read_layers else [])
            )
            for layer in self.layers
        }
        self._row_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._keep_cache: dict[tuple[int, int], tuple[torch.Tensor | None, bool]] = {}

    def gate_fired(self, intervention: Intervention) -> torch.Tensor | None:
        """Per-input-row gate decisions (after prefill), or None if the gate has not been evaluated."""
        return self.gate_open.get(id(intervention))

    def __call__(self, layer: int, hidden: torch.Tensor, *, start: int | None = None) -> torch.Tensor:
        """The edited ``hidden`` (rows × t × d) of ``layer``; ``start``, the position of its first
        token, defaults to the positions this layer has seen (an engine that schedules chunks and
        recomputes after preemption gives it)."""
        if start is None:
            start = self.seen.get(layer, self.start_position)
        length = hidden.shape[1]
        self.seen[layer] = start + length
        rows = self._row_index(hidden.shape[0], hidden.device)
        last = self.prompt_length - 1
        if layer in self._read_layers and start <= last < start + length:
            self._read_prompt(layer, hidden[:, last - start], rows)
        for intervention in self.interventions:
            if layer not in intervention.layers:
                continue
            first, end = self._positions[id(intervention)]
            first, end = max(0, first - start), length if end is None else min(length, end - start)
            if first >= end:
                continue
            keep, any_kept = self._rows_to_edit(intervention, rows)
            if not any_kept:
                continue
            span = hidden[:, first:end]
            if intervention.reads_prompt_state:
                derived = self.derived.get((id(intervention), layer))
                if derived is None:  # the prompt's last token passed in an earlier generate
                    continue
                edited = intervention.edit(layer, span, rows, derived=derived)
            else:
                edited = intervention.edit(layer, span, rows)
            if keep is not None:
                edited = torch.where(keep[:, None, None], edited, span)
            if first > 0 or end < length:
                edited = torch.cat([hidden[:, :first], edited, hidden[:, end:]], dim=1)
            hidden = edited
        return hidden

    @staticmethod
    def step_together(states: Sequence[ActiveInterventions], layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Edit ``hidden`` (n × 1 × d): one token past the prompt of each of ``states``, n calls of one
        input row each that share their interventions (an engine's requests steered alike), as n
        separate calls would; each state's gates and prompt-derived edits are its own.

        Returns ``hidden`` itself when nothing applies."""
        singles = torch.zeros(len(states), dtype=torch.long, device=hidden.device)  # each call's only row
        for intervention in states[0].interventions:
            if layer not in intervention.layers or intervention.scope == "last_prompt":  # it ends with the prompt
                continue
            if intervention.gate is None and intervention.rows is None and not intervention.reads_prompt_state:
                hidden = intervention.edit(layer, hidden, singles)  # every call edits this token alike
                continue
            kept = [state._rows_to_edit(intervention, singles[:1]) for state in states]
            keep = torch.tensor([any_kept and (mask is None or bool(mask[0])) for mask, any_kept in kept])
            if intervention.reads_prompt_state:
                derived = [state.derived.get((id(intervention), layer)) for state in states]
                keep &= torch.tensor([value is not None for value in derived])
            if not bool(keep.any()):
                continue
            if intervention.reads_prompt_state:
                filler = next(value for value in derived if value is not None)
                stacked = torch.cat([filler if value is None else value for value in derived])
                edited = intervention.edit(
                    layer, hidden, torch.arange(len(states), device=hidden.device), derived=stacked
                )
            else:
                edited = intervention.edit(layer, hidden, singles)  # shared tensors: each call's row 0
            hidden = edited if bool(keep.all()) else torch.where(keep.to(hidden.device)[:, None, None], edited, hidden)
        return hidden

    def _row_index(self, n: int, device: torch.device) -> torch.Tensor:
        """The input row of each of the ``n`` decoder rows (cached: hooks run per layer and token)."""
        key = (n, device)
        if key not in self._row_cache:
            if n % len(self.rows):
                raise RuntimeError(
                    f"decoder batch of {n} rows is not a multiple of the call's {len(self.rows)} input rows"
                )
            self._row_cache[key] = self.rows.to(device).repeat_interleave(n // len(self.rows))
        return self._row_cache[key]

    def _read_prompt(self, layer: int, state: torch.Tensor, rows: torch.Tensor) -> None:
        """Record the last prompt token's unedited state; decide gates and derive edits from it.

        Inherited states (a continuation of an earlier generate of the same call) are kept.
        """
        if layer in self.prompt_states:
            return
        by_row = state.new_zeros(self.batch_size, state.shape[-1])
        by_row[rows] = state
        self.prompt_states[layer] = by_row
        for intervention in self.interventions:
            gate = intervention.gate
            if gate is not None and gate.layer == layer and id(intervention) not in self.gate_open:
                decided = torch.as_tensor(gate.decide(by_row), dtype=torch.bool)
                self.gate_open[id(intervention)] = decided.to(state.device)
            if intervention.reads_prompt_state and layer in intervention.layers:
                self.derived[(id(intervention), layer)] = intervention.derive(layer, by_row)

    def _rows_to_edit(self, intervention: Intervention, rows: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(mask of decoder rows to edit, or None for all; whether any is edited), cached once known."""
        key = (id(intervention), rows.shape[0])
        if key in self._keep_cache:
            return self._keep_cache[key]
        keep = None
        if intervention.rows is not None:
            keep = intervention.rows.to(rows.device)[rows]
        if intervention.gate is not None:
            gate = self.gate_open.get(id(intervention))
            if gate is None:  # not decided yet: closed, and not cached
                return None, False
            gate = gate.to(rows.device)[rows]
            keep = gate if keep is None else keep & gate
        result = (None, True) if keep is None or bool(keep.all()) else (keep, bool(keep.any()))
        self._keep_cache[key] = result
        return result


_ACTIVE: contextvars.ContextVar[ActiveInterventions | None] = contextvars.ContextVar(
    "vlm_safety_active_interventions", default=None
)


class InterventionHooks:
    """One forward hook per decoder layer, installed once, acting only inside ``activate``."""

    def __init__(self, layers: Sequence[torch.nn.Module], hidden_size: int):
        self.num_layers, self.hidden_size = len(layers), hidden_size
        self._handles = [
            layer.register_forward_hook(functools.partial(self._hook, index)) for index, layer in enumerate(layers)
        ]

    def _hook(self, index, module, args, output):
        active = _ACTIVE.get()
        if active is None or active.owner is not self:
            return None
        if isinstance(output, tuple):
            return (active(index, output[0]), *output[1:])
        return active(index, output)

    @contextlib.contextmanager
    def activate(
        self,
        interventions: Sequence[Intervention],
        *,
        prompt_length: int,
        batch_size: int,
        start_position: int = 0,
        rows: Sequence[int] | None = None,
        read: Iterable[int] = (),
        inherit: ActiveInterventions | None = None,
    ) -> Iterator[ActiveInterventions | None]:
        """Apply ``interventions`` to forward passes of this model in this context only.

        ``batch_size`` is the number of input rows the interventions were made for.
        ``start_position`` is the number of positions already in the KV cache when the
        first forward pass runs (0 for a fresh generate). ``rows``, for a generate that
        continues some of those rows (say N candidates of row 3: ``[3] * N``), gives the
        input row of each row of this generate; by default row i is input row i.
        ``read`` names layers whose last-prompt-token states to record in the yielded
        state's ``prompt_states`` (with no interventions: a read-out of a forward pass).
        ``inherit``, the state of an earlier generate over the whole prompt with the same
        interventions, carries its gate decisions and prompt-derived edits into a
        continuation that never sees the prompt's last token again.
        """
        read = sorted({int(layer) for layer in read})
        if not interventions and not read:
            yield None
            return
        for intervention in interventions:
            self._check_layers(type(intervention).__name__, intervention.layers)
            intervention.check(self.hidden_size, batch_size)
        self._check_layers("read", read)
        state = ActiveInterventions(
            self,
            interventions,
            prompt_length=prompt_length,
            batch_size=batch_size,
            start_position=start_position,
            rows=rows,
            read=read,
            inherit=inherit,
        )
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)

    def _check_layers(self, what: str, layers: Iterable[int]) -> None:
        bad = sorted(layer for layer in layers if not 0 <= layer < self.num_layers)
        if bad:
            raise ValueError(
                f"{what} targets layer {bad[0]}, but the model has decoder layers 0..{self.num_layers - 1}"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == reference.dtype and tensor.device == reference.device:
        return tensor
    return tensor.to(device=reference.device, dtype=reference.dtype)
