"""attach/detach and the defended ``generate``.

``attach`` replaces ``model.generate`` on that one object (never the class) with
``Attachment.generate``. Without a ``vlm_safety`` flag, or with no defense enabled, it
calls the original generate with exactly the caller's arguments (``images=`` aside), so
the tokens are bit-for-bit those of plain transformers. Otherwise one ``GenerationCall``
carries the request through the defenses in the order ``defense.py`` documents, and the
output gets one ``SafetyReport`` per input row as ``.safety``.

Everything about a call lives on its ``GenerationCall`` and in context variables, never on
the shared model, so one attached model serves concurrent calls with different flags.
"""

from __future__ import annotations

import collections
import contextvars
import copy
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..steering.interventions import InterventionHooks
from . import plugins
from .adapters import find_adapter
from .config import GENERATION_CONFIG_KEY, SafetyConfig
from .defense import Defense, DefenseInstances, Resources
from .errors import DefenseError, GenerationCancelled
from .policy import Policy, load_policy
from .report import DefenseRecord, SafetyReport

ATTACHMENT_ATTRIBUTE = "_vlm_safety_attachment"
_RUNNING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("vlm_safety_running", default=frozenset())
"""The attachments running a defended call in this context (thread or task)."""
INNER_KINDS = ("interventions", "logits_processors", "stopping_criteria")  # work done inside the inner generate
CACHE_LIMIT = 64  # distinct configs (and defense instances) kept per attached model
# Per prompt-shaped input: (value of an inserted token, value of a padding token).
INSERTED_VALUES = {
    "input_ids": (None, None),
    "attention_mask": (1, 0),
    "token_type_ids": (0, 0),
    "mm_token_type_ids": (0, 0),
}


def attach(model, processor, *, adapter=None, trust_remote_code: bool = False, policy=None):
    """Make ``model.generate`` apply the defenses its generation config names; idempotent.

    ``policy`` (a Policy, a YAML path or a mapping: core/policy.py) is the operator's floor:
    every call runs its defenses, and a request's own flags only do what its
    ``client_flags`` allows. Without one, the call's flags decide (and the model's
    generation_config.json flags are the default for calls that pass none).

    ``adapter`` overrides the model adapter chosen by ``model.config.model_type``.
    ``trust_remote_code`` is the operator's permission for defenses to load checkpoints
    that run their own code (a reward model's ``modeling_*.py``); without it, flags that ask
    for remote code (from a call, or a model folder's generation_config.json) are refused.
    Returns the model, for chaining.
    """
    attachment = get_attachment(model)
    if attachment is not None:
        if trust_remote_code and not attachment.resources.trust_remote_code:
            raise ValueError("this model is already attached without trust_remote_code; detach it first")
        if policy is not None and load_policy(policy) != attachment.policy:
            raise ValueError("this model is already attached under another policy; detach it first")
        return model
    attachment = Attachment(model, processor, adapter or find_adapter(model, processor), trust_remote_code)
    attachment.policy = load_policy(policy) if policy is not None else None
    model.__dict__[ATTACHMENT_ATTRIBUTE] = attachment
    model.__dict__["generate"] = attachment.generate
    return model


def detach(model):
    """Undo ``attach``: remove the hooks and the generate override; returns the model."""
    attachment = model.__dict__.pop(ATTACHMENT_ATTRIBUTE, None)
    if attachment is not None:
        attachment.hooks.remove()
        if attachment.replaced is None:
            model.__dict__.pop("generate", None)
        else:  # the model's own instance-level generate (transformers' custom_generate) comes back
            model.__dict__["generate"] = attachment.replaced
    return model


def get_attachment(model) -> Attachment | None:
    """The Attachment of an attached model, else None."""
    return model.__dict__.get(ATTACHMENT_ATTRIBUTE)


class Attachment:
    """What ``attach`` adds to one model: adapter, hooks, caches, and the defended generate."""

    def __init__(self, model, processor, adapter, trust_remote_code: bool = False):
        self.model, self.processor, self.adapter = model, processor, adapter
        self.original_generate = model.generate
        # A generate the instance already had (transformers' custom_generate sets one), restored by detach.
        self.replaced = model.__dict__.get("generate")
        self.hooks = InterventionHooks(adapter.decoder_layers(), adapter.hidden_size())
        self.resources = Resources(trust_remote_code=trust_remote_code)
        self.policy: Policy | None = None
        self._configs: dict[str, SafetyConfig] = {}
        self._defenses = DefenseInstances(self.resources, CACHE_LIMIT)

    def generate(self, *args, **kwargs):
        """transformers' generate, plus the defenses named by the ``vlm_safety`` flag."""
        images = kwargs.pop("images", None)
        if id(self) in _RUNNING.get():
            # Called from inside one of this model's defended calls (a custom generate that decodes
            # with model.generate): the outer call's defenses already apply, so this is plain generate.
            kwargs.pop(GENERATION_CONFIG_KEY, None)
            return type(self.model).generate(self.model, *args, **kwargs)
        flags = kwargs.pop(GENERATION_CONFIG_KEY, None)
        if flags is None:
            # Under a policy only the call's own config speaks for the request; the model's is the operator's.
            fallback = self.model.generation_config if self.policy is None else None
            flags = getattr(kwargs.get("generation_config") or fallback, GENERATION_CONFIG_KEY, None)
        origins = None
        if self.policy is not None:
            config, origins = self.policy.resolve(self.config_for(flags) if flags is not None else None)
        elif flags is None:
            return self.original_generate(*args, **kwargs)
        else:
            config = self.config_for(flags)
        if not config.enabled:
            return self.original_generate(*args, **kwargs)
        if args:
            kwargs.update(zip(("input_ids", "generation_config"), args))
        return GenerationCall(self, config, kwargs, images, origins).run()

    def config_for(self, flags: Any) -> SafetyConfig:
        """The validated SafetyConfig of a ``vlm_safety`` value, parsed once per distinct value."""
        if isinstance(flags, SafetyConfig):
            return flags
        key = repr(flags)
        config = self._configs.get(key)
        if config is None:
            config = SafetyConfig.from_dict(flags)
            if len(self._configs) >= CACHE_LIMIT:
                self._configs.clear()
            self._configs[key] = config
        return config

    def defenses_for(self, config: SafetyConfig) -> list[Defense]:
        """One Defense instance per (name, options), shared by every call that uses them."""
        return self._defenses.of(config)


class _DefenseFailed(Exception):
    """Carries a defense's exception out of the chain, with the defense's name."""

    def __init__(self, defense: str, error: BaseException):
        super().__init__(defense, error)
        self.defense, self.error = defense, error


class _CallerAbort(Exception):
    """Carries an exception the caller's streamer raised (how servers cancel a stream) out of the chain."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


_PASS_THROUGH = (_DefenseFailed, _CallerAbort, GenerationCancelled)
"""What the chain lets through unchanged: not a failure of the defenses, so never a refusal."""


class GenerationCall:
    """One defended generate call: its inputs, raw images, reports and the inner generate.

    It implements ``DefenseCall`` (core/defense.py), the contract defenses code against;
    ``run`` and the underscored members are the runtime's own.
    """

    def __init__(
        self, attachment: Attachment, config: SafetyConfig, kwargs: dict, images: Any, origins: dict | None = None
    ):
        self._attachment = attachment
        self.model, self.processor, self.adapter = attachment.model, attachment.processor, attachment.adapter
        self.resources = attachment.resources
        self.config = config
        self.inputs = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        self.kwargs = {name: value for name, value in kwargs.items() if name not in self.inputs}
        if "input_ids" not in self.inputs:
            raise DefenseError("a defended generate needs `input_ids` (inputs_embeds alone cannot be defended)")
        self.prompt_ids = self.inputs["input_ids"]
        self.batch_size = self.prompt_ids.shape[0]
        self._images = _normalise_images(images, self.batch_size)
        self.defenses = attachment.defenses_for(config)
        self.reports = [SafetyReport(row=row, origins=dict(origins or {})) for row in range(self.batch_size)]
        self._interventions: list | None = None
        self._prompt_pass = None  # the interventions' state after the last generate over the whole prompt
        holders = {defense.name for defense in self._defenses_doing("around_generate")}
        self.streamer = _GatedStreamer(self.kwargs["streamer"], holders) if self.kwargs.get("streamer") else None
        if self.streamer is not None:
            self.kwargs["streamer"] = self.streamer

    # -- what defenses use -------------------------------------------------------------

    @property
    def images(self) -> list[list[Any]]:
        """One list of raw PIL images per row (empty for text-only rows).

        Raises DefenseError when the request has image inputs but ``images=`` was not
        given and the model adapter cannot rebuild them from ``pixel_values``.
        """
        if self._images is None:
            if "pixel_values" not in self.inputs:
                self._images = [[] for _ in range(self.batch_size)]
            else:
                self._images = self.adapter.rebuild_images(self.inputs)
        return self._images

    @property
    def image_rows(self) -> list[bool]:
        """Per row, whether its prompt holds image tokens (the rows image-only defenses act on)."""
        return self.adapter.image_token_mask(self.inputs["input_ids"]).any(dim=1).tolist()

    @functools.cached_property
    def generation_config(self):
        """The GenerationConfig in force for this call, as the inner generate will see it: the
        caller's with its unset values (eos, pad, ...) filled from the model's, else the model's.
        (A server that sends its own config, as transformers serve does, leaves eos unset.)"""
        given, model_config = self.kwargs.get("generation_config"), self.model.generation_config
        if given is None:
            return model_config
        config = copy.deepcopy(given)
        config.update(**model_config.to_dict(), defaults_only=True)
        return config

    def setting(self, name: str) -> Any:
        """A generation setting as the inner generate sees it: the call's keyword argument if
        given, else the GenerationConfig's (``max_new_tokens``, ``num_beams``, ...)."""
        value = self.kwargs.get(name)
        return getattr(self.generation_config, name, None) if value is None else value

    def record(self, defense: str, row: int) -> DefenseRecord:
        """The record of ``defense`` in row ``row``'s report, created on first use."""
        records = self.reports[row].defenses
        if defense not in records:
            records[defense] = DefenseRecord(name=defense)
        return records[defense]

    def insert_prompt_tokens(
        self, token_ids: Sequence[int], positions: torch.Tensor, rows: Sequence[bool] | None = None
    ) -> None:
        """Insert ``token_ids`` into the prompt of each selected row at ``positions[row]``.

        Rows not selected get as many padding tokens on the left instead, so the batch
        stays rectangular and left-padded; the attention mask and token-type tensors grow
        with it. The caller's prompt is restored in the returned sequences, so slicing by
        the original prompt length keeps working.
        """
        ids = torch.as_tensor(list(token_ids), dtype=self.prompt_ids.dtype, device=self.prompt_ids.device)
        shape = tuple(self.inputs["input_ids"].shape)
        selected = [True] * shape[0] if rows is None else list(rows)
        for name, tensor in list(self.inputs.items()):
            if tuple(tensor.shape) != shape:
                continue
            if name not in INSERTED_VALUES:
                raise DefenseError(
                    f"cannot insert prompt tokens: input `{name}` has the prompt's shape "
                    f"{shape} but no known fill value"
                )
            content, padding = INSERTED_VALUES[name]
            if name == "input_ids":
                content, padding = ids, self.pad_token_id()
            content = torch.as_tensor(content, dtype=tensor.dtype, device=tensor.device).expand(len(ids))
            padding = torch.as_tensor(padding, dtype=tensor.dtype, device=tensor.device).expand(len(ids))
            self.inputs[name] = torch.stack(
                [
                    torch.cat([row[:at], content, row[at:]]) if keep else torch.cat([padding, row])
                    for row, at, keep in zip(tensor, positions.tolist(), selected)
                ]
            )

    def pad_token_id(self) -> int:
        """The pad token id of this call (generation config first, then the tokenizer)."""
        pad = token_id_list(self.generation_config.pad_token_id) or token_id_list(self.adapter.tokenizer.pad_token_id)
        if not pad:
            raise DefenseError("cannot pad the batch: neither the generation config nor the tokenizer has a pad token")
        return pad[0]

    def pass_stream(self, defense: str) -> None:
        """``defense`` will not veto what is streamed from now on: once every around-generate
        defense of the call has said so, tokens reach the caller's streamer as they come."""
        if self.streamer is not None:
            self.streamer.release(defense)

    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence ids of this call's generation config (none, one or several)."""
        return token_id_list(self.generation_config.eos_token_id)

    def generate(self, *, rows: Sequence[int] | None = None, **overrides) -> GenerateDecoderOnlyOutput:
        """The inner transformers generate: current inputs, the defenses' interventions,
        logits processors and stopping criteria; ``overrides`` replace generate kwargs.

        ``rows`` marks a continuation of some of this call's rows from a KV cache of their
        prompt: per generated row, the call row it continues. ``overrides`` then carry all
        the model inputs (``past_key_values``, the grown ``input_ids`` and attention mask;
        image inputs live in the cache), and interventions steer each row as its call row,
        with positions counted from the call's prompt, as in one uninterrupted generate.
        """
        kwargs = _inner_generate_kwargs({**self.kwargs, **(self.inputs if rows is None else {}), **overrides})
        if rows is not None:  # per-call state the model would keep between passes (Qwen2-VL: M-RoPE offsets)
            kwargs.update(self.adapter.continuation_inputs(self.inputs, rows, kwargs))
        processors = self._collect("logits_processors")
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), *processors])
        criteria = self._collect("stopping_criteria")
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), *criteria])
        if self._interventions is None:  # once per call: continuations must reuse the same objects
            self._interventions = self._collect("interventions")
        prompt, cache = (self.inputs if rows is not None else kwargs)["input_ids"], kwargs.get("past_key_values")
        with self._attachment.hooks.activate(
            self._interventions,
            prompt_length=prompt.shape[1],
            batch_size=prompt.shape[0],
            start_position=cache.get_seq_length() if cache is not None else 0,
            rows=rows,
            inherit=self._prompt_pass if rows is not None else None,
        ) as state:
            output = self._attachment.original_generate(**kwargs)
        if rows is None:
            self._prompt_pass = state
        return output

    # -- the call itself ----------------------------------------------------------------

    def run(self):
        """Apply the defenses, generate, restore the caller's prompt and attach the reports."""
        wants_dict = _wants_dict_output(self.kwargs, self.generation_config)
        running = _RUNNING.set(_RUNNING.get() | {id(self._attachment)})
        try:
            output = self._defended()
        except _CallerAbort as abort:  # the caller's streamer raised: its own exception, unchanged
            raise abort.error from None
        finally:
            _RUNNING.reset(running)
        output.safety = self.reports
        for report in self.reports:
            plugins.pm.hook.safety_report(report=report)
        return output if wants_dict else output.sequences

    def _defended(self):
        """The defenses and the generate, failing closed: a defense's failure answers with the refusal."""
        try:
            for defense in self._defenses_doing("transform_inputs"):
                self._step(defense, defense.transform_inputs, self)
            output = self._around(self._defenses_doing("around_generate"), {})
            output = self._restore_prompt(output)
            if self.streamer is not None:
                self.streamer.release_all()
            return output
        except _DefenseFailed as failure:
            if self.config.on_error == "raise":
                raise failure.error from None
            output = self._refuse(f"{failure.defense}: {type(failure.error).__name__}: {failure.error}")
            for report in self.reports:
                report.refused_by = failure.defense
            return output

    def _around(self, chain: list[Defense], overrides: dict):
        if not chain:
            return self._innermost(overrides)
        outer, rest = chain[0], chain[1:]
        return self._step(
            outer, outer.around_generate, self, lambda **inner: self._around(rest, {**overrides, **inner})
        )

    def _innermost(self, overrides: dict):
        """The inner generate at the end of the chain. It runs the defenses' interventions,
        processors and criteria, so its failure (an edit that overflowed, a processor that
        raised mid-decoding) is theirs, and fails closed like one of their methods."""
        try:
            return self.generate(**overrides)
        except _PASS_THROUGH:
            raise
        except Exception as error:  # noqa: BLE001 - any failure under the defenses fails closed
            acting = [defense.name for defense in self.defenses if set(type(defense).kinds()) & set(INNER_KINDS)]
            raise _DefenseFailed("+".join(acting) or "generate", error) from error

    def _step(self, defense: Defense, method: Callable, *args):
        """Run one defense method, timing it into every row's record, tagging its failures."""
        started = time.perf_counter()
        try:
            return method(*args)
        except _PASS_THROUGH:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a defense fails closed
            raise _DefenseFailed(defense.name, error) from error
        finally:
            elapsed = time.perf_counter() - started
            for row in range(self.batch_size):
                self.record(defense.name, row).time_s += elapsed

    def _defenses_doing(self, kind: str) -> list[Defense]:
        return [defense for defense in self.defenses if kind in type(defense).kinds()]

    def _collect(self, kind: str) -> list:
        return [
            item for defense in self._defenses_doing(kind) for item in self._step(defense, getattr(defense, kind), self)
        ]

    def _restore_prompt(self, output):
        prompt = self.inputs["input_ids"]
        if prompt is self.prompt_ids:
            return output
        copies = output.sequences.shape[0] // self.batch_size
        original = self.prompt_ids.repeat_interleave(copies, dim=0)
        output.sequences = torch.cat([original, output.sequences[:, prompt.shape[1] :]], dim=1)
        return output

    def _refuse(self, reason: str):
        """Fail closed: every row answers with the configured refusal text."""
        refusal = self.adapter.encode(self.config.refusal)["input_ids"]
        answer = torch.tensor(
            refusal + self.eos_token_ids()[:1], dtype=self.prompt_ids.dtype, device=self.prompt_ids.device
        )
        copies = self.setting("num_return_sequences") or 1
        prompt = self.prompt_ids.repeat_interleave(copies, dim=0)
        sequences = torch.cat([prompt, answer.expand(prompt.shape[0], -1)], dim=1)
        for report in self.reports:
            report.refused, report.error = True, reason
        if self.streamer is not None:
            self.streamer.refuse(self.prompt_ids, answer)
            for report in self.reports:
                report.streamed_tokens = self.streamer.sent_tokens
        return GenerateDecoderOnlyOutput(sequences=sequences)


class _GatedStreamer:
    """The caller's streamer behind a gate: nothing reaches it until every around-generate
    defense of the call has passed the stream (``release``), so a defense can still veto
    what was generated; puts before that are held, in order, and sent on release.

    A refusal drops what is held and sends the refusal instead; if tokens had already gone
    out, the refusal ends the stream after them and ``sent_tokens`` says how many. What the
    caller's streamer raises (a server cancelling the stream) aborts the call with that exception.
    """

    def __init__(self, streamer, holders: set[str]):
        self.streamer, self.holders = streamer, set(holders)
        self.held: collections.deque = collections.deque()  # puts (tensors) and _END, in order
        self.started = self.ended = False  # started: anything was put, held or sent
        self.sent_puts = self.sent_tokens = 0

    def put(self, value) -> None:
        self.started = True
        self.held.append(value)
        self._flush()

    def end(self) -> None:
        self.held.append(_END)
        self._flush()

    def release(self, holder: str) -> None:
        """``holder`` will not veto what is streamed from now on in this call."""
        self.holders.discard(holder)
        self._flush()

    def release_all(self) -> None:
        """Every defense is done: send whatever is held."""
        self.holders.clear()
        self._flush()

    def refuse(self, prompt: torch.Tensor, answer: torch.Tensor) -> None:
        """Stream the refusal in place of anything held: the prompt first if nothing went out yet."""
        self.held.clear()
        if self.ended:
            return
        if not self.sent_puts:
            self._send(prompt)
        self._send(answer, counted=False)
        self.ended = True
        self._forward(self.streamer.end)

    def _flush(self) -> None:
        while self.held and not self.holders and not self.ended:
            value = self.held.popleft()
            if value is _END:
                self.ended = True
                self._forward(self.streamer.end)
            else:
                self._send(value)

    def _send(self, value, counted: bool = True) -> None:
        if counted and self.sent_puts:  # the first put is the prompt
            self.sent_tokens += int(torch.as_tensor(value).numel())
        self.sent_puts += 1
        self._forward(self.streamer.put, value)

    @staticmethod
    def _forward(method, *args) -> None:
        try:
            method(*args)
        except Exception as error:  # noqa: BLE001 - the caller's own exception, handed back to the caller
            raise _CallerAbort(error) from error


_END = object()


def token_id_list(value: int | Sequence[int] | None) -> list[int]:
    """A token-id setting (eos, pad) that transformers allows as None, one id or several, as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(item) for item in value]


def _wants_dict_output(kwargs: dict, generation_config) -> bool:
    if "return_dict_in_generate" in kwargs:
        return bool(kwargs["return_dict_in_generate"])
    return bool(getattr(generation_config, "return_dict_in_generate", False))


def _inner_generate_kwargs(kwargs: dict) -> dict:
    """``kwargs`` for the inner generate, asking for a GenerateDecoderOnlyOutput.

    Generation settings given beside a GenerationConfig (the caller's, or a defense's
    overrides) are folded into a copy of it, as transformers itself would, so that a
    defended call never trips transformers' warning about passing both.
    """
    config = kwargs.get("generation_config")
    if config is None:
        return {**kwargs, "return_dict_in_generate": True}
    config = copy.deepcopy(config)
    rest = config.update(**{name: value for name, value in kwargs.items() if name != "generation_config"})
    config.return_dict_in_generate = True
    return {**rest, "generation_config": config}


def _normalise_images(images: Any, batch_size: int) -> list[list[Any]] | None:
    """``images=`` as one list per row: accepts an image, a list (one per row) or a list of lists."""
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    rows = [list(item) if isinstance(item, (list, tuple)) else ([] if item is None else [item]) for item in images]
    if len(rows) != batch_size:
        raise DefenseError(
            f"images= has {len(rows)} entries but the batch has {batch_size} rows; "
            "pass one image (or one list of images, or None) per row"
        )
    return rows
