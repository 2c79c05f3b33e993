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

``call`` is a ``DefenseCall``: the whole of what a defense may use of a generate call.
The runtime's ``GenerationCall`` implements it; anything else on that class is the
runtime's own business.

In front of an inference engine (``vlm-safety serve --upstream``) a defense works on the
conversation and the engine's answers instead of tensors, through two more methods, on a
``GatewayCall``: ``transform_messages`` (edit the chat messages) and ``around_upstream``
(async: evaluate the engine's answer, ask it for others). A defense without them runs
inside the engine (``engine_work``), or cannot run behind one.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .options import NoOptions, Strength

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from ..steering.artifacts import ArtifactStore
    from ..steering.interventions import Intervention
    from .adapters.base import ModelAdapter
    from .report import DefenseRecord

WORK_KINDS = ("transform_inputs", "around_generate", "interventions", "logits_processors", "stopping_criteria")
GATEWAY_KINDS = ("transform_messages", "around_upstream")


class CallStreamer(Protocol):
    """The caller's streamer as a defense sees it: what is put is held until every
    around-generate defense has passed the stream (``DefenseCall.pass_stream``)."""

    started: bool

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class DefenseCall(Protocol):
    """What a defense may use of one defended ``generate`` call.

    Read the request (``inputs``, ``images``, ``generation_config``), edit the prompt
    (``insert_prompt_tokens``), run the rest of the generation (``generate``), and say what
    was done, per row (``record``). Everything is per call: two threads never share one.
    """

    model: Any
    """The attached transformers model (possibly a PEFT wrapper)."""
    processor: Any
    adapter: ModelAdapter
    """The model family's adapter: decoder layers, prompt layout, tokenizer, image masks."""
    resources: Resources
    """Heavy objects shared by every call on this model (scorers), loaded once per key."""
    inputs: dict[str, torch.Tensor]
    """The model's tensors (``input_ids``, ``attention_mask``, ``pixel_values``, ...)."""
    kwargs: dict[str, Any]
    """Every other generate argument (``generation_config``, ``max_new_tokens``, ...)."""
    prompt_ids: torch.Tensor
    """The caller's ``input_ids``, unchanged by prompt edits."""
    batch_size: int
    streamer: CallStreamer | None
    """The caller's streamer, or None."""

    @property
    def images(self) -> list[list[Any]]:
        """One list of raw PIL images per row (empty for text-only rows)."""

    @property
    def image_rows(self) -> list[bool]:
        """Per row, whether its prompt holds image tokens."""

    @property
    def generation_config(self) -> GenerationConfig:
        """The GenerationConfig in force (the caller's, else the model's)."""

    def setting(self, name: str) -> Any:
        """A generation setting as the inner generate sees it (the call's keyword, else the config's)."""

    def record(self, defense: str, row: int) -> DefenseRecord:
        """The record of ``defense`` in row ``row``'s report."""

    def insert_prompt_tokens(
        self, token_ids: Sequence[int], positions: torch.Tensor, rows: Sequence[bool] | None = None
    ) -> None:
        """Insert tokens into selected rows' prompts at ``positions[row]``; the caller's prompt is restored."""

    def pad_token_id(self) -> int:
        """The call's pad token id."""

    def eos_token_ids(self) -> list[int]:
        """The call's end-of-sequence ids (none, one or several)."""

    def pass_stream(self, defense: str) -> None:
        """Declare that ``defense`` will not veto what is streamed from now on. Until every
        around-generate defense of the call has, the caller's streamer receives nothing."""

    def generate(self, *, rows: Sequence[int] | None = None, **overrides: Any) -> GenerateDecoderOnlyOutput:
        """The inner transformers generate with every defense's processors, criteria and interventions."""


@dataclass
class Completion:
    """One answer of the upstream engine (one choice)."""

    text: str
    finish_reason: str
    """``stop`` (an end of sequence or a stop string), ``length``, or ``content_filter`` (replaced)."""
    completion_tokens: int
    prompt_tokens: int = 0
    stop_string: str | None = None
    """The stop string that ended it (included at the end of ``text``), None otherwise."""

    @property
    def ended(self) -> bool:
        """It ended with the model's end of sequence (neither a stop string nor the token cap)."""
        return self.finish_reason == "stop" and self.stop_string is None


class GatewayCall(Protocol):
    """What a defense may use of one request answered by an upstream engine (``around_upstream``).

    The conversation is editable; ``upstream`` asks the engine for answers, with the
    engine-side defenses of the request applied (steering travels with every request).
    """

    messages: list[dict]
    """The OpenAI chat messages sent upstream (image parts as ``data:`` URIs); edit in place."""
    images: list[Any]
    """The conversation's images, decoded (PIL)."""
    n: int
    """Choices the client asked for."""
    max_tokens: int
    resources: Resources
    """Scorers (CLIP, reward models) of this gateway process, loaded once per key."""
    device: str
    """Where the gateway's scorers run by default (``cuda`` when present)."""

    def record(self, defense: str, choice: int = 0) -> DefenseRecord:
        """The record of ``defense`` in choice ``choice``'s report."""

    def user_text(self) -> str:
        """The text of the conversation's last user turn."""

    def pass_stream(self, defense: str) -> None:
        """``defense`` will not veto the answer: once every around-upstream defense has passed,
        the engine's answer streams to the client as it comes."""

    def stream_answer(self, defense: str, choice: int, text: str) -> None:
        """More of the answer ``defense`` returns for ``choice``, for a streaming client as it is decided
        (an aligned answer sentence by sentence); sent only while no other defense holds the answer.
        The answer returned must begin with everything streamed."""

    async def upstream(
        self,
        *,
        answer_opening: str | None = None,
        n: int | None = None,
        max_tokens: int | None = None,
        sampling: dict | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[Completion]:
        """The engine's answers to the conversation (``answer_opening``: continuing an assistant
        turn that opens with that text); the request's own sampling unless ``sampling`` is given."""

    async def opening_tokens(self, text: str) -> int:
        """How many tokens the engine's template makes of ``text`` opening the answer."""

    async def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a worker thread (scorers, which would block the event loop)."""


class EngineRow(Protocol):
    """One request as an inference engine's worker sees it, for building its steering."""

    has_image: bool
    """Whether the request's prompt holds image tokens."""

    def place(self, artifact: Any, layers: Sequence[int], *, rows: int | None = None) -> dict[int, torch.Tensor]:
        """``artifact``'s tensors for ``layers`` (first ``rows`` rows) on the engine's device and dtype."""


@dataclass(frozen=True)
class EngineWork:
    """What of a defense an inference engine runs for one request, through our engine plugins
    (vLLM: a logits processor and decoder-layer hooks), instead of the transformers runtime."""

    answer_prefix: str | None = None
    """Text the answer must open with (forced token by token), e.g. ETA's interference prefix."""
    steering: Callable[[EngineRow], Sequence[Intervention]] | None = None
    """Builds the request's residual-stream interventions in the engine's worker; validated
    already, so it cannot fail on a request (None: no steering)."""


class Defense:
    """Subclass, set ``name`` and ``Options``, override the kinds of work it does."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    strength: ClassVar[tuple[Strength, ...]] = ()
    """The options ``vlm-safety tune`` sweeps, each with its values, weakest first (none: not tunable)."""

    def __init__(self, options: Any, resources: Resources):
        self.options = options
        self.resources = resources

    @classmethod
    def conformance_options(cls, model, processor, workdir: Path) -> dict[str, dict]:
        """Option sets for the conformance suite every defense passes (tests/test_conformance.py).

        Return ``{"neutral": ..., "active": ...}``: under ``neutral`` the defense is enabled
        but changes nothing (the tokens of plain greedy generate, on a batch of an image row
        and a text-only row of ``model``); under ``active`` it acts on that batch, and
        deterministically under greedy decoding. ``workdir`` is an empty folder for any
        artifact the options need. A defense that declares none fails the suite.
        """
        return {}

    @classmethod
    def engine_work(cls, options: Any, artifacts: ArtifactStore) -> EngineWork:
        """What an inference engine (vLLM) runs of this defense with ``options``, whose files are
        in ``artifacts`` (loaded by the engine at its start); a ConfigError naming the key for
        what cannot run there. By default nothing can: the defense never runs silently weakened."""
        from .errors import ConfigError

        raise ConfigError(
            f"{cls.name} cannot run inside the inference engine; run it in front of the engine "
            "(vlm-safety serve) or with transformers",
            path=f"defenses.{cls.name}",
        )

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The kinds of work this defense does: the base methods it overrides."""
        return tuple(kind for kind in WORK_KINDS if cls.overrides(kind))

    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether the subclass overrides the base's ``method`` (a kind of work it does; classmethods too)."""
        return inspect.getattr_static(cls, method) is not inspect.getattr_static(Defense, method)

    def records(self, call: DefenseCall, ran: bool | Sequence[bool] = True) -> list[DefenseRecord]:
        """This defense's record in every row's report, each marked ``ran`` (one flag, or one per row)."""
        flags = [ran] * call.batch_size if isinstance(ran, bool) else list(ran)
        records = [call.record(self.name, row) for row in range(call.batch_size)]
        for record, flag in zip(records, flags):
            record.ran = bool(flag)
        return records

    def transform_inputs(self, call: DefenseCall) -> None:
        """Edit ``call.inputs`` in place (through the call's helpers) before generation."""

    def around_generate(self, call: DefenseCall, proceed: Callable[..., Any]) -> Any:
        """Run ``proceed(**overrides)`` (the rest of the chain; ``overrides`` replace generate
        kwargs, e.g. ``streamer=None`` to buffer) and return a GenerateDecoderOnlyOutput."""
        return proceed()

    def interventions(self, call: DefenseCall) -> Sequence[Intervention]:
        """Residual-stream interventions to activate during the inner generate."""
        return ()

    def logits_processors(self, call: DefenseCall) -> Sequence[Any]:
        """LogitsProcessors to add to the inner generate."""
        return ()

    def stopping_criteria(self, call: DefenseCall) -> Sequence[Any]:
        """StoppingCriteria to add to the inner generate."""
        return ()

    # -- in front of an upstream engine (vlm-safety serve --upstream) ---------------------------

    @classmethod
    def runs_in_gateway(cls) -> bool:
        """Whether the defense runs in front of an engine (it overrides a gateway method)."""
        return any(cls.overrides(kind) for kind in GATEWAY_KINDS)

    def transform_messages(self, call: GatewayCall) -> None:
        """Edit ``call.messages`` in place before anything is sent upstream."""

    async def around_upstream(self, call: GatewayCall, proceed: Callable[[], Any]) -> list[Completion]:
        """Await ``proceed()`` (the rest of the chain: the engine's answers) and return the answers."""
        return await proceed()

    @classmethod
    def gateway_needs(cls, options: Any) -> tuple[str, ...]:
        """Upstream capabilities the defense needs with ``options`` (``extensions``: vLLM's request
        extensions: ``n``, ``top_k``, continuing the assistant turn); checked at start."""
        return ()


class DefenseInstances:
    """One Defense instance per (name, options), shared by every call that uses them; at most
    ``limit`` kept (requests' own flags may name any number of option sets)."""

    def __init__(self, resources: Resources, limit: int = 64):
        self.resources, self.limit = resources, limit
        self._instances: dict[tuple[str, str], Defense] = {}
        self._lock = threading.Lock()

    def of(self, config) -> list[Defense]:
        """The instances of a SafetyConfig's defenses, in its order."""
        from . import plugins

        defenses = []
        for name, options in config.defenses.items():
            key = (name, repr(options))
            with self._lock:
                if key not in self._instances:
                    if len(self._instances) >= self.limit:
                        self._instances.clear()
                    self._instances[key] = plugins.get_defense(name)(options, self.resources)
                defenses.append(self._instances[key])
        return defenses


class Resources:
    """Heavy objects (CLIP, reward models) loaded once per attached model, keyed by their config.

    ``trust_remote_code`` is the operator's permission (``attach(..., trust_remote_code=True)``)
    for a resource to run a checkpoint's own code; flags alone never grant it.
    """

    def __init__(self, *, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code
        self._items: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def check_remote_code(self, wanted: bool, what: str) -> None:
        """Raise DefenseError when ``what`` asks for remote code the operator has not allowed."""
        if wanted and not self.trust_remote_code:
            from .errors import DefenseError

            raise DefenseError(
                f"{what} asks to run the checkpoint's own code, which this model's operator has not allowed; "
                "allow it with vsp.attach(model, processor, trust_remote_code=True) or --trust-remote-code, "
                "or set it to false"
            )

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        """The object cached under ``key``, loading it with ``load()`` the first time."""
        with self._lock:
            if key not in self._items:
                self._items[key] = load()
            return self._items[key]
