"""The ``transformers`` engine: the attached model in this process, every defense.

The model is attached under the operator's policy, so the policy holds for every
generate the engine makes. Generations run in a pool of worker threads (``concurrency``)
and their events cross into the event loop. Calls run side by side, except where the
shared state would make answers depend on each other: a model whose adapter is not proven
thread-safe runs one call at a time, and a seeded request runs alone (the random generator
is global to the process, so a seeded answer is reproducible only if nothing else samples
meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from ...core.config import GENERATION_CONFIG_KEY
from ...core.errors import GenerationCancelled
from ...core.policy import Policy
from ...core.runtime import attach, get_attachment, token_id_list
from .base import ChatJob, Delta, Engine, Finish

_DONE = object()


class TransformersEngine(Engine):
    """Generates with ``model.generate`` of the attached model, ``concurrency`` calls at a time."""

    name = "transformers"
    max_stream_choices = 1  # transformers streams one sequence per generate

    def __init__(
        self,
        model,
        processor,
        policy: Policy,
        *,
        model_id: str,
        concurrency: int = 4,
        trust_remote_code: bool = False,
    ):
        super().__init__(model_id, policy)
        attach(model, processor, trust_remote_code=trust_remote_code, policy=policy)
        self.model, self.adapter = model, get_attachment(model).adapter
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm-safety-generate")
        self._lock = _SharedExclusiveLock()

    async def chat(self, job: ChatJob) -> AsyncIterator[Delta | Finish]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = loop.run_in_executor(self._executor, self._run, job, emit)
        work.add_done_callback(lambda _: events.put_nowait(_DONE))  # after every event the worker emitted
        try:
            while (event := await events.get()) is not _DONE:
                yield event
            work.result()  # the worker's exception, if any
        finally:
            job.cancel.set()  # stops the generation of a client that left; a no-op once done

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- in a worker thread -------------------------------------------------------------

    def _run(self, job: ChatJob, emit: Callable) -> None:
        with self._lock.hold(exclusive=job.seed is not None or not self.adapter.thread_safe):
            job.started.set()
            if job.cancel.is_set():
                raise GenerationCancelled
            inputs = self.adapter.conversation_inputs([job.messages] * job.n)
            streamer = _StreamedText(self.adapter.tokenizer, job.stop, emit) if job.stream else None
            if job.seed is not None:
                transformers.set_seed(job.seed)
            output = self.model.generate(
                **inputs,
                images=[job.images] * job.n if job.images else None,
                generation_config=self._generation_config(job),
                vlm_safety=job.flags,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_CancelWhenSet(job.cancel)]),
                tokenizer=self.adapter.tokenizer,
                return_dict_in_generate=True,
            )
        prompt_tokens = inputs["input_ids"].shape[1]
        reports = getattr(output, "safety", None)
        for index, answer in enumerate(output.sequences[:, prompt_tokens:].tolist()):
            emit(self._finish(job, index, answer, reports[index] if reports else None, prompt_tokens))

    def _generation_config(self, job: ChatJob):
        """The model's generation config with the request's sampling; never the folder's own flags
        (under the policy the request speaks only through ``vlm_safety=``)."""
        config = copy.deepcopy(self.model.generation_config)
        if hasattr(config, GENERATION_CONFIG_KEY):
            delattr(config, GENERATION_CONFIG_KEY)
        config.max_new_tokens, config.min_new_tokens = job.max_tokens, job.min_tokens or None
        if job.temperature is not None:
            config.do_sample = job.temperature > 0
            if config.do_sample:
                config.temperature = job.temperature
        if job.top_p is not None:
            config.top_p = job.top_p
        config.stop_strings = job.stop or None
        return config

    def _finish(self, job: ChatJob, index: int, answer: list[int], report, prompt_tokens: int) -> Finish:
        """One choice's Finish: the answer up to its end of sequence, cut at a stop sequence."""
        eos = set(token_id_list(self.model.generation_config.eos_token_id))
        pad = token_id_list(self.model.generation_config.pad_token_id)
        ended = next((position for position, token in enumerate(answer) if token in eos), None)
        if ended is not None:
            answer = answer[: ended + 1]
        else:  # a row of a batch that stopped early is padded to the longest
            while answer and pad and answer[-1] == pad[0]:
                answer.pop()
        text, stopped = cut_at_stop(self.adapter.tokenizer.decode(answer, skip_special_tokens=True), job.stop)
        if report is not None and report.replaced:
            reason = "content_filter"
        elif ended is None and not stopped and len(answer) >= job.max_tokens:
            reason = "length"
        else:
            reason = "stop"
        return Finish(index, text, reason, report, prompt_tokens, len(answer))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (which is not part of the answer), and whether one was found."""
    cuts = [found for found in (text.find(sequence) for sequence in stop) if found >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _StreamedText(TextStreamer):
    """transformers' TextStreamer, its finished text sent on as Delta events (one choice).

    What could still be the start of a stop sequence is held back, and nothing after a stop
    sequence goes out, so the streamed text equals the final text cut at the stop.
    """

    def __init__(self, tokenizer, stop: list[str], emit: Callable):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.emit = stop, emit
        self.hold = max(map(len, stop), default=1) - 1
        self.pending, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        ready, self.stopped = cut_at_stop(self.pending, self.stop)
        if not self.stopped and not stream_end and self.hold:
            ready = self.pending[: max(0, len(self.pending) - self.hold)]
        self.pending = self.pending[len(ready) :]
        if ready:
            self.emit(Delta(0, ready))


class _CancelWhenSet(StoppingCriteria):
    """Aborts the generate (GenerationCancelled) once the server sets the job's cancel event."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs):
        if self.cancel.is_set():
            raise GenerationCancelled
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _SharedExclusiveLock:
    """Many shared holders at once, or one exclusive holder alone; waiting exclusive holders go first."""

    def __init__(self):
        self._condition = threading.Condition()
        self._shared = self._exclusive_waiting = 0
        self._exclusive = False

    @contextlib.contextmanager
    def hold(self, exclusive: bool):
        with self._condition:
            if exclusive:
                self._exclusive_waiting += 1
                self._condition.wait_for(lambda: not self._exclusive and not self._shared)
                self._exclusive_waiting -= 1
                self._exclusive = True
            else:
                self._condition.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
                self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._condition.notify_all()
