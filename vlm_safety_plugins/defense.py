"""Defense: the base class of every built-in and third-party defense.

A defense contributes any of five kinds of work; the runtime calls only the methods a
subclass overrides, in this order for every defended ``generate`` call:

1. ``transform_inputs(call)``     edit ``call.inputs`` before anything runs (prompt text, images)
2. ``around_generate(call, proceed)``  wrap the rest: evaluate, then maybe re-generate
3. ``interventions(call)``        residual-stream edits active during the inner generate
4. ``logits_processors(call)``    extra LogitsProcessors for the inner generate
5. ``stopping_criteria(call)``    extra StoppingCriteria for the inner generate

Defenses apply in the order the config lists them (around-generate steps nest: the first
listed is outermost). One instance serves every call with the same options, from any
thread, so per-request state lives on ``call``, never on ``self``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from .options import NoOptions

if TYPE_CHECKING:
    from .interventions import Intervention
    from .runtime import GenerationCall

WORK_KINDS = ("transform_inputs", "around_generate", "interventions", "logits_processors", "stopping_criteria")


class Defense:
    """Subclass, set ``name`` and ``Options``, override the kinds of work it does."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def __init__(self, options: Any, resources: "Resources"):
        self.options = options
        self.resources = resources

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The kinds of work this defense does: the base methods it overrides."""
        return tuple(kind for kind in WORK_KINDS if getattr(cls, kind) is not getattr(Defense, kind))

    def transform_inputs(self, call: "GenerationCall") -> None:
        """Edit ``call.inputs`` in place (through the call's helpers) before generation."""

    def around_generate(self, call: "GenerationCall", proceed: Callable[..., Any]) -> Any:
        """Run ``proceed(**overrides)`` (the rest of the chain; ``overrides`` replace generate
        kwargs, e.g. ``streamer=None`` to buffer) and return a GenerateDecoderOnlyOutput."""
        return proceed()

    def interventions(self, call: "GenerationCall") -> Sequence["Intervention"]:
        """Residual-stream interventions to activate during the inner generate."""
        return ()

    def logits_processors(self, call: "GenerationCall") -> Sequence[Any]:
        """LogitsProcessors to add to the inner generate."""
        return ()

    def stopping_criteria(self, call: "GenerationCall") -> Sequence[Any]:
        """StoppingCriteria to add to the inner generate."""
        return ()


class Resources:
    """Heavy objects (CLIP, reward models) loaded once per attached model, keyed by their config."""

    def __init__(self):
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        """The object cached under ``key``, loading it with ``load()`` the first time."""
        with self._lock:
            if key not in self._items:
                self._items[key] = load()
            return self._items[key]
