"""ETA in front of an inference engine (``vlm-safety serve --upstream``), as docs/defenses/eta.md describes.

The evaluation runs in the gateway (CLIP on the request's images, the reward model on the
engine's answer); the alignment is engine requests. Shallow alignment continues an
assistant turn that opens with the interference prefix. The sentence-level best-of-N is
one request per sentence with ``n`` candidates, the reference's sampling (top-k,
temperature), the sentence cap as ``max_tokens`` and sentence ends as stop strings, each
continuing the assistant turn with the prefix and the sentences accepted so far; the
engine's prefix cache serves the prompt and image again each round. The candidates are
scored and chosen as the transformers path does (``sentence_scores``). CLIP and the reward
model score the items of concurrent requests in one batch (``gateway.batching``).

With ``speculate``, a request whose image the pre-check finds unsafe starts its alignment
beside the vanilla answer, and uses it only if the post-check also says unsafe: an engine
with continuous batching runs both for little more than one.
"""

from __future__ import annotations

import asyncio
import time

import torch

from ...core.defense import Completion
from ...core.report import MODIFIED
from ...gateway.batching import Batcher
from ...scorers.reward import BEST_OF_N_INSTRUCTION, POST_EVAL_INSTRUCTION
from .defense import post_checked, pre_check, pre_unsafe, sentence_scores

TEXT_STOPS = (". ", "? ", "! ", "\n")
"""Sentence ends as stop strings (vLLM takes at most four)."""


def boundary_stops(boundary: str) -> tuple[str, ...]:
    """Stop strings for a sentence end: ``reference``, a ``.``; ``text``, a terminator followed by a
    space, or a newline. A decimal point ("3.5") is no end, as in the transformers path; a list
    number's "1. " ends a sentence here, where that path goes on, and a closing quote after the
    terminator ('." ') none, where that path ends it."""
    return (".",) if boundary == "reference" else TEXT_STOPS


async def around_upstream(eta, call, proceed) -> list[Completion]:
    """ETA's work on one request (each of its ``n`` choices): evaluate, then align the choices both
    checks find unsafe."""
    options, choices = eta.options, range(call.n)
    records = [call.record(eta.name, choice) for choice in choices]
    started = time.perf_counter()
    embeddings, pre = None, None
    if call.images:
        scored = await _image_batcher(eta, call)(call.images)
        embeddings, pre = torch.cat([embedding for embedding, _ in scored]), max(score for _, score in scored)
    checked, image_unsafe = post_checked(options, pre), pre_unsafe(options, pre)
    time_s = {"clip": time.perf_counter() - started}
    for record in records:
        record.ran = True
        if pre is not None:
            record.scores["pre"] = pre
        details = {"pre_unsafe": image_unsafe, "unsafe": False, "aligned": False}
        record.details.update(details, time_s=dict(time_s))
    if not checked:  # the image is safe: the vanilla answer streams live
        call.pass_stream(eta.name)
        return await proceed()

    speculate = options.speculate and image_unsafe  # a safe image under `safe_images: post` rarely aligns
    streams = [_AlignedStream(eta, call, choice, used=not speculate) for choice in choices]
    speculated = [
        asyncio.create_task(align(eta, call, embeddings, choice, streams[choice])) if speculate else None
        for choice in choices
    ]
    try:
        started = time.perf_counter()
        answers = await proceed()
        vanilla_s = time.perf_counter() - started
        started = time.perf_counter()
        user_turn = _user_turn(eta, call, POST_EVAL_INSTRUCTION)
        post = await _reward_batcher(eta, call)([(user_turn, answer.text) for answer in answers])
        reward_s = time.perf_counter() - started
        unsafe = [choice for choice in choices if post[choice] <= options.post_threshold]
        for choice, record in enumerate(records):
            record.scores["post"] = post[choice]
            record.details["time_s"].update(vanilla=vanilla_s, reward=reward_s)
            if speculated[choice] is not None:
                record.details["speculation"] = "used" if choice in unsafe else "wasted"
        started = time.perf_counter()
        for choice in unsafe:
            streams[choice].use()
        aligned = await asyncio.gather(
            *(speculated[choice] or align(eta, call, embeddings, choice, streams[choice]) for choice in unsafe)
        )
        align_s = time.perf_counter() - started
    finally:
        for task in speculated:
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()  # an unused alignment's failure is nobody's: mark it seen
    for choice, answer in zip(unsafe, aligned):
        record = records[choice]
        record.details.update(unsafe=True, aligned=True)
        record.details["time_s"]["align"] = align_s
        record.decision, record.replaced_answer = MODIFIED, True
        answer.prompt_tokens = answers[choice].prompt_tokens
        answers[choice] = answer
    return answers


def _image_batcher(eta, call) -> Batcher:
    """CLIP's pre-check of images, batched across the gateway's requests: per image (embedding, score)."""
    clip = eta.clip(call.resources, call.device)

    def embed_and_score(images):
        embeddings, scores = pre_check(clip, [[image] for image in images])
        return list(zip(embeddings, scores))

    return call.resources.get(("gateway batcher", clip), lambda: Batcher(embed_and_score))


def _reward_batcher(eta, call) -> Batcher:
    """The reward model on (user turn, answer) pairs, batched across the gateway's requests."""
    reward = eta.reward(call.resources, call.device)

    def score(pairs):
        return reward.score([turn for turn, _ in pairs], [text for _, text in pairs]).tolist()

    return call.resources.get(("gateway batcher", reward), lambda: Batcher(score))


def _user_turn(eta, call, instruction: str) -> str:
    return instruction if eta.options.reward_sees == "instruction" else call.user_text()


class _AlignedStream:
    """One choice's aligned answer for a streaming client, as its sentences are accepted; held
    back while the alignment is speculative (it may go unused), sent from when it is used."""

    def __init__(self, eta, call, choice: int, *, used: bool):
        self.send = lambda text: call.stream_answer(eta.name, choice, text)
        self.held, self.used = "", used

    def add(self, text: str) -> None:
        self.held += text
        self._flush()

    def use(self) -> None:
        self.used = True
        self._flush()

    def _flush(self) -> None:
        if self.used and self.held:
            self.send(self.held)
            self.held = ""


async def align(eta, call, image_embedding, choice: int, stream: _AlignedStream) -> Completion:
    """Choice ``choice``'s aligned answer: the interference prefix, then best-of-N (per the ablation),
    each accepted sentence into ``stream``."""
    options = eta.options
    budget = min(options.max_new_tokens, call.max_tokens)
    prefix = options.prefix if options.alignment != "deep_only" else ""
    left = budget - (await call.opening_tokens(prefix) if prefix else 0)
    if left <= 0:  # the token budget ends inside the prefix
        return Completion(prefix, "length", budget)
    stream.add(prefix)
    if options.alignment == "shallow_only":
        (rest,) = await call.upstream(answer_opening=prefix, max_tokens=left, n=1)
        return Completion(prefix + rest.text, rest.finish_reason, budget - left + rest.completion_tokens)
    search = options.best_of_n
    rewards, clip = _reward_batcher(eta, call), eta.clip(call.resources, call.device)
    user_turn = _user_turn(eta, call, BEST_OF_N_INSTRUCTION)
    stops = boundary_stops(options.boundary)
    accepted, generated, sentences, finish = "", 0, 0, "length"
    decode_s = score_s = 0.0
    while generated < left:
        started = time.perf_counter()
        candidates = await call.upstream(
            answer_opening=prefix + accepted or None,
            n=search.n,
            max_tokens=min(search.max_sentence_tokens, left - generated),
            sampling={"temperature": search.temperature, "top_k": search.top_k, "top_p": 1.0},
            stop=stops,
        )
        decode_s += time.perf_counter() - started
        started = time.perf_counter()
        texts = [_sentence(candidate) for candidate in candidates]
        scored = await rewards([(user_turn, prefix + accepted + text) for text in texts])
        scores = await call.blocking(
            sentence_scores,
            torch.tensor(scored),
            clip,
            texts,
            [candidate.ended for candidate in candidates],
            sentences + 1,
            image_embedding,
            search.alpha,
        )
        score_s += time.perf_counter() - started
        winner = int(torch.argmax(scores))
        accepted += texts[winner]
        stream.add(texts[winner])
        generated += candidates[winner].completion_tokens
        sentences += 1
        if candidates[winner].ended:
            finish = "stop"
            break
    details = call.record(eta.name, choice).details
    details.update(sentences=sentences, candidates=sentences * search.n)
    details["time_s"].update(decode=decode_s, score=score_s)
    return Completion(prefix + accepted, finish, budget - left + generated)


def _sentence(candidate: Completion) -> str:
    """A candidate's sentence: its text without the space that a stop string needed after the end."""
    stop = candidate.stop_string
    return candidate.text[:-1] if stop and stop.endswith(" ") and candidate.text.endswith(" ") else candidate.text
