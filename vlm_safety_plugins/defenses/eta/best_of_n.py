"""Sentence-level best-of-N decoding from one shared prefix KV cache (ETA's deep alignment).

Each round samples N candidate continuations of the accepted text, each up to its own
sentence boundary, as one batch: the single-row KV cache of the context is repeated N
ways, so the prompt and image are never re-encoded. The caller scores the candidates;
the winner's row of the cache is kept, cropped to the winner's length, and the next
round continues from it without recomputation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from ...core.runtime import token_id_list
from .processors import SentenceBoundaryCriteria

# Per-position model inputs that grow with the sequence, and the value of a generated token.
GROWING_INPUTS = {"attention_mask": 1, "token_type_ids": 0, "mm_token_type_ids": 0}


@dataclass(frozen=True)
class Candidates:
    """One round's N candidate sentences."""

    token_ids: list[list[int]]
    texts: list[str]
    ended_with_eos: list[bool]


@dataclass
class SearchResult:
    """The accepted tokens (after the context), and what the search cost."""

    token_ids: list[int] = field(default_factory=list)
    sentences: int = 0
    candidates: int = 0
    ended_with_eos: bool = False
    decode_s: float = 0.0
    score_s: float = 0.0


# score(candidates, sentence_index, accepted_token_ids) -> one score per candidate; the index counts from 1
Scorer = Callable[[Candidates, int, list[int]], torch.Tensor]


class _StopRecorder(StoppingCriteria):
    """Wraps the boundary criteria and records how many tokens each row had when it stopped."""

    def __init__(self, criteria: SentenceBoundaryCriteria, start: int):
        self.criteria, self.start = criteria, start
        self.lengths: list[int | None] | None = None

    def __call__(self, input_ids, scores, **kwargs):
        done = self.criteria(input_ids, scores, **kwargs)
        if self.lengths is None:
            self.lengths = [None] * input_ids.shape[0]
        for row in done.nonzero().flatten().tolist():
            if self.lengths[row] is None:
                self.lengths[row] = input_ids.shape[1] - self.start
        return done


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that appends in place instead of concatenating.

    ``DynamicLayer`` rebuilds its whole key/value tensors with ``torch.cat`` at every
    generated token, so decoding N candidates after a 600-token image prompt spends most
    of its time copying the cache. This layer keeps spare room after the cached positions
    (an eighth of them, at least 64) and writes new states into it; ``keys``/``values`` are
    views of that buffer. Whatever replaces them (a crop keeps the buffer; selecting or
    repeating rows, beam reordering) is taken over by the next ``update`` with one copy.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not (self._in_buffer(length) and length + new <= self._key_buffer.shape[-2]):
            self._rebuffer(length, key_states, room=new + max(64, (length + new) // 8))
        self._key_buffer[..., length : length + new, :] = key_states
        self._value_buffer[..., length : length + new, :] = value_states
        self.keys = self._key_buffer[..., : length + new, :]
        self.values = self._value_buffer[..., : length + new, :]
        return self.keys, self.values

    def _in_buffer(self, length: int) -> bool:
        """Whether ``keys``/``values`` are still the first ``length`` positions of our buffers."""
        buffer = getattr(self, "_key_buffer", None)
        return (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.keys.shape[:2] == buffer.shape[:2]
            and self.keys.stride() == buffer.stride()
        )

    def _rebuffer(self, length: int, like: torch.Tensor, *, room: int) -> None:
        batch, heads, _, width = like.shape
        for name, current in (("_key_buffer", self.keys), ("_value_buffer", self.values)):
            buffer = like.new_empty(batch, heads, length + room, width)
            if length:
                buffer[..., :length, :] = current
            setattr(self, name, buffer)


def recording_cache(config) -> DynamicCache:
    """An empty cache for a generate that will be cropped and continued.

    Full-attention layers are ``GrowingLayer`` s; sliding-window layers keep what a later
    crop needs (``activate_past_recording``).
    """
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    cache.activate_past_recording()
    return cache


def prefill_cache(generate: Callable, config, inputs: dict[str, torch.Tensor]) -> DynamicCache:
    """A cache holding all but the last position of ``inputs`` (images included), one row per row."""
    cache = recording_cache(config)
    generate(
        **inputs, past_key_values=cache, max_new_tokens=1, min_new_tokens=0, do_sample=False, num_beams=1, streamer=None
    )
    cache.crop(-1)
    return cache


def sentence_best_of_n(
    generate: Callable,
    tokenizer,
    context: dict[str, torch.Tensor],
    score: Scorer,
    *,
    cache: DynamicCache,
    n: int,
    top_k: int,
    temperature: float,
    max_sentence_tokens: int,
    max_new_tokens: int,
    boundary: str,
    eos_token_id: int | Sequence[int],
    streamer=None,
) -> SearchResult:
    """Extend one row's ``context`` sentence by sentence, keeping the best of ``n`` each time.

    ``context`` holds the per-position model inputs of a single row (``input_ids``
    1 × L, its attention mask and token types; no image inputs: those live in the
    cache). ``cache`` holds the first L − 1 positions of the context (``prefill_cache``
    builds one) and is consumed. ``generate`` is a transformers-style generate. Stops
    when the winner ends with EOS or ``max_new_tokens`` tokens were accepted; each
    accepted sentence goes to ``streamer`` as soon as it wins.
    """
    eos = set(token_id_list(eos_token_id))
    context = {name: value for name, value in context.items() if name == "input_ids" or name in GROWING_INPUTS}
    result = SearchResult()
    while len(result.token_ids) < max_new_tokens:
        started = time.perf_counter()
        candidates = _sample(
            generate,
            tokenizer,
            context,
            cache,
            n=n,
            top_k=top_k,
            temperature=temperature,
            max_tokens=min(max_sentence_tokens, max_new_tokens - len(result.token_ids)),
            boundary=boundary,
            eos=eos,
        )
        result.decode_s += time.perf_counter() - started
        started = time.perf_counter()
        scores = score(candidates, result.sentences + 1, result.token_ids)
        result.score_s += time.perf_counter() - started
        winner = int(torch.argmax(scores))
        tokens = candidates.token_ids[winner]
        context = extend_context(context, tokens)
        keep_row(cache, winner, length=context["input_ids"].shape[1] - 1)
        result.token_ids += tokens
        result.sentences += 1
        result.candidates += n
        if streamer is not None:
            streamer.put(torch.tensor(tokens))
        if candidates.ended_with_eos[winner]:
            result.ended_with_eos = True
            break
    return result


def _sample(generate, tokenizer, context, cache, *, n, top_k, temperature, max_tokens, boundary, eos) -> Candidates:
    """Sample n continuations of the context, each up to its own sentence boundary, in one batch."""
    start = context["input_ids"].shape[1]
    cache.batch_repeat_interleave(n)
    cache.activate_past_recording()  # sliding-window layers keep what the crop may need
    recorder = _StopRecorder(
        SentenceBoundaryCriteria(
            tokenizer, prompt_length=start, max_sentence_tokens=max_tokens, eos_token_id=sorted(eos), boundary=boundary
        ),
        start,
    )
    batch = {name: value.repeat_interleave(n, dim=0) for name, value in context.items()}
    output = generate(
        **batch,
        past_key_values=cache,
        do_sample=True,
        top_k=top_k,
        top_p=1.0,
        temperature=temperature,
        max_new_tokens=max_tokens,
        min_new_tokens=0,
        stopping_criteria=StoppingCriteriaList([recorder]),
        return_dict_in_generate=True,
        streamer=None,
    )
    new = output.sequences[:, start:]
    lengths = [length or new.shape[1] for length in (recorder.lengths or [new.shape[1]] * n)]
    token_ids = [new[row, :length].tolist() for row, length in enumerate(lengths)]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return Candidates(token_ids, texts, [bool(ids) and ids[-1] in eos for ids in token_ids])


def keep_row(cache: DynamicCache, row: int, *, length: int) -> None:
    """Keep one row of the cache, cropped to its first ``length`` positions.

    ``crop`` is only ever given the number of positions to drop, negated (or 0): transformers
    before 5.20 reads a positive argument as the length to keep and ignores one past the end,
    where later versions raise; so a cache shorter than ``length`` is an error here in both.
    """
    cached = cache.get_seq_length()
    if length > cached:
        raise ValueError(f"cannot keep {length} positions of a cache holding {cached}")
    cache.batch_select_indices(torch.tensor([row], device=_cache_device(cache)))
    cache.crop(-(cached - length))


def _cache_device(cache: DynamicCache) -> torch.device:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            return layer.keys.device
    return torch.device("cpu")


def extend_context(context: dict[str, torch.Tensor], tokens: list[int]) -> dict[str, torch.Tensor]:
    """The context with ``tokens`` appended, and its per-position inputs grown to match."""
    ids = context["input_ids"]
    added = torch.tensor([tokens], dtype=ids.dtype, device=ids.device)
    grown = {"input_ids": torch.cat([ids, added], dim=1)}
    for name, value in context.items():
        if name in GROWING_INPUTS:
            grown[name] = torch.cat([value, torch.full_like(added, GROWING_INPUTS[name], dtype=value.dtype)], dim=1)
    return grown
