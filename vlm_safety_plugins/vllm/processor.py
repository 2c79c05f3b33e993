"""The vLLM V1 logits processor through which every request's defenses reach the engine.

Registered through the entry-point group ``vllm.logits_processors``, so every vLLM server
that can import this package loads it: it must be, and is, inert for a request that asks
for nothing (no flags, no operator policy). It does three things:

- ``validate_params`` (API server): a request's flags that the policy refuses or the engine
  cannot run are a 400 naming the key, before the request is admitted;
- the answer prefix (``Defense.engine_work``: ETA with ``alignment: shallow_only``): each of
  the first decoding steps allows exactly the prefix's next token. The prefix is tokenized
  as the chat template writes it at the start of an assistant turn, as the transformers path
  does, so both paths force the same ids;
- steering (CMRM, VLM-Guard): it builds each request's interventions as the request joins
  the worker's batch, for the decoder-layer hooks of ``steering.py`` to apply per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ..core.errors import ConfigError
from ..steering.interventions import ActiveInterventions
from . import requests, steering


@dataclass
class _RequestWork:
    prefix: list[int]  # token ids to force (empty: none)
    output: list[int]  # the request's output ids so far (vLLM's live list)
    edits: ActiveInterventions | None


class SafetyLogitsProcessor(LogitsProcessor):
    """Forces the answer prefix the request's defenses ask for, and routes their steering."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        steering.check_engine(vllm_config)
        self._vllm_config = vllm_config
        model_config = vllm_config.model_config
        self._tokenizer_source = model_config.tokenizer
        self._trust_remote_code = model_config.trust_remote_code
        self._requests: dict[int, _RequestWork] = {}  # batch row -> its request's work

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """A request's flags that the policy or the engine cannot take: a ValueError (HTTP 400) naming the key."""
        try:
            requests.engine_work(sampling_params.extra_args)
        except ConfigError as error:
            raise ValueError(str(error)) from None

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax of the forced steps

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self._requests, batch_update, self._new_request):
            engine = steering.engine(self._vllm_config)
            if engine is not None:
                engine.rows = {row: work.edits for row, work in self._requests.items() if work.edits is not None}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, work in self._requests.items():
            step = len(work.output)
            if step < len(work.prefix):  # every other token impossible: greedy and sampling alike pick this one
                logits[row] = float("-inf")
                logits[row, work.prefix[step]] = 0.0
        return logits

    def _new_request(self, params: SamplingParams, prompt_ids, output_ids: list[int]) -> _RequestWork | None:
        engine = steering.engine(self._vllm_config)
        config = requests.resolved_config(params.extra_args)
        work = requests.resolved_work(config, engine.artifacts if engine is not None else None)
        if work is None:
            return None
        edits = None
        if work.steering is not None:
            if engine is None:  # check_engine let steering through without hooks: never answer unsteered
                raise RuntimeError("vlm-safety steering requested, but no steering hooks are installed")
            edits = engine.row(prompt_ids, work.steering, config.cache_key())
        prefix = self._prefix_ids(work.answer_prefix) if work.answer_prefix is not None else []
        return _RequestWork(prefix, output_ids, edits) if prefix or edits is not None else None

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one processor per engine, a few prefixes
    def _prefix_ids(self, text: str) -> list[int]:
        return self._adapter.response_ids(text)

    @functools.cached_property
    def _adapter(self):
        """The generic adapter over the model's processor: enough to tokenize an assistant turn's opening."""
        from ..core.adapters.base import processor_adapter

        return processor_adapter(self._tokenizer_source, trust_remote_code=self._trust_remote_code)
