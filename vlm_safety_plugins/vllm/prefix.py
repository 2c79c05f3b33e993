"""ETA's interference prefix as a vLLM V1 logits processor.

Registered through the entry-point group ``vllm.logits_processors``, so every vLLM server
that can import this package loads it: it must be, and is, inert for a request that asks
for nothing (no flags, no operator policy). For a request whose defenses call for an
answer prefix (``Defense.engine_work``: ETA with ``alignment: shallow_only``), each of the
first decoding steps allows exactly the prefix's next token; decoding is free after it.
The prefix is tokenized as the chat template writes it at the start of an assistant turn,
as the transformers path does, so both paths force the same ids.
"""

from __future__ import annotations

import functools

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ..core.errors import ConfigError
from . import requests


class InterferencePrefix(LogitsProcessor):
    """Forces the answer prefix the request's defenses ask for, token by token."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        model_config = vllm_config.model_config
        self._tokenizer_source = model_config.tokenizer
        self._trust_remote_code = model_config.trust_remote_code
        self._forced: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (prefix ids, output ids so far)

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
        process_dict_updates(self._forced, batch_update, self._new_request)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (prefix, output) in self._forced.items():
            step = len(output)
            if step < len(prefix):  # every other token impossible: greedy and sampling alike pick this one
                logits[row] = float("-inf")
                logits[row, prefix[step]] = 0.0
        return logits

    def _new_request(self, params: SamplingParams, prompt_ids, output_ids: list[int]):
        work = requests.engine_work(params.extra_args)
        if work is None or work.answer_prefix is None:
            return None
        return self._prefix_ids(work.answer_prefix), output_ids

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one processor per engine, a few prefixes
    def _prefix_ids(self, text: str) -> list[int]:
        return self._adapter.response_ids(text)

    @functools.cached_property
    def _adapter(self):
        """The generic adapter over the model's processor: enough to tokenize an assistant turn's opening."""
        from transformers import AutoProcessor

        from ..core.adapters.base import ModelAdapter

        processor = AutoProcessor.from_pretrained(self._tokenizer_source, trust_remote_code=self._trust_remote_code)
        return ModelAdapter(None, processor)
