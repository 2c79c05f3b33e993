"""One request in front of the upstream engine: the gateway defenses' chain around the engine's answer.

``GatewayRequest`` implements ``GatewayCall`` (core/defense.py). It runs the request's
gateway-side defenses in config order (``transform_messages``, then ``around_upstream``,
the first listed outermost) around one upstream request; the engine-side defenses travel
with every request it sends (``vllm_xargs``). Like the transformers runtime it fails
closed: a defense that raises answers with the configured refusal (``on_error: refuse``).
An upstream that fails is not a defense failure: the client gets its 502/503, never an
answer the defenses did not see.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.config import GENERATION_CONFIG_KEY, SafetyConfig
from ..core.defense import Completion, Defense
from ..core.report import DefenseRecord, SafetyReport
from ..serving.engines.base import ChatJob
from .upstream import UpstreamError, extension_fields

if TYPE_CHECKING:
    from .engine import UpstreamEngine


class _DefenseFailed(Exception):
    def __init__(self, defense: str, error: BaseException):
        super().__init__(defense, error)
        self.defense, self.error = defense, error


class GatewayRequest:
    """A job's conversation, sampling and reports, and the upstream requests made for it."""

    def __init__(
        self,
        engine: UpstreamEngine,
        job: ChatJob,
        config: SafetyConfig,
        origins: dict[str, str],
        defenses: list[Defense],
        engine_flags: str | None,
    ):
        self._engine, self._job, self.config = engine, job, config
        self.defenses, self._engine_flags = defenses, engine_flags
        self.on_text: Callable[[int, str], None] | None = None
        """Where streamed text goes (choice index, text); set by the engine."""
        self.config_enabled = config.enabled
        """Whether any defense applies (gateway- or engine-side); without one there is no report."""
        self.resources, self.device = engine.resources, engine.device
        self.images, self.n, self.max_tokens = job.images, job.n, job.max_tokens
        self.messages = _openai_messages(job.messages)
        self.reports = [SafetyReport(row=index, origins=dict(origins)) for index in range(job.n)]
        self._holders = {defense.name for defense in self._doing("around_upstream")}
        self._streamed: set[int] = set()
        """The choices a defense streamed part of its answer of (``stream_answer``)."""

    # -- what defenses use ---------------------------------------------------------------------

    def record(self, defense: str, choice: int = 0) -> DefenseRecord:
        records = self.reports[choice].defenses
        if defense not in records:
            records[defense] = DefenseRecord(name=defense)
        return records[defense]

    def user_text(self) -> str:
        for message in reversed(self._job.messages):
            if message["role"] == "user":
                content = message["content"]
                if isinstance(content, str):
                    return content
                return "".join(part["text"] for part in content if part["type"] == "text")
        return ""

    def pass_stream(self, defense: str) -> None:
        self._holders.discard(defense)

    def stream_answer(self, defense: str, choice: int, text: str) -> None:
        if self._job.stream and self.on_text is not None and self._holders <= {defense} and text:
            self._streamed.add(choice)
            self.on_text(choice, text)

    async def upstream(
        self,
        *,
        answer_opening: str | None = None,
        n: int | None = None,
        max_tokens: int | None = None,
        sampling: dict | None = None,
        stop: Sequence[str] | None = None,
    ) -> list[Completion]:
        return await self._engine.upstream.complete(self._body(answer_opening, n, max_tokens, sampling, stop))

    def _body(self, answer_opening=None, n=None, max_tokens=None, sampling=None, stop=None) -> dict:
        """The chat-completions body of one upstream request; by default the client's own request."""
        job, own = self._job, sampling is None and answer_opening is None
        messages = self.messages
        if answer_opening:
            messages = [*messages, {"role": "assistant", "content": answer_opening}]
        sampling = dict(sampling or {"temperature": job.temperature, "top_p": job.top_p, "seed": job.seed})
        top_k = sampling.pop("top_k", None)
        extra: dict[str, Any] = {}
        if self._engine.capabilities.extensions:
            extra = extension_fields(
                choices=n or job.n, top_k=top_k, answer_opening=bool(answer_opening), stops=stop is not None
            )
            if own and job.min_tokens:
                extra["min_tokens"] = job.min_tokens
            if self._engine.capabilities.add_special_tokens:
                extra["add_special_tokens"] = True
        if self._engine_flags is not None:
            extra["vllm_xargs"] = {GENERATION_CONFIG_KEY: self._engine_flags}
        stop = list(stop) if stop is not None else job.stop
        return {
            "model": self._engine.upstream.model,
            "messages": messages,
            "n": n or job.n,
            "max_tokens": max_tokens or job.max_tokens,
            **{name: value for name, value in sampling.items() if value is not None},
            **({"stop": stop} if stop else {}),
            **extra,
        }

    async def opening_tokens(self, text: str) -> int:
        return await self._engine.opening_tokens(text)

    async def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    # -- the chain -----------------------------------------------------------------------------

    async def run(self) -> list[Completion]:
        """The answers after every gateway defense; the refusal if one failed (``on_error: refuse``)."""
        try:
            for defense in self._doing("transform_messages"):
                await self._step(defense, defense.transform_messages, self)
            return await self._around(self._doing("around_upstream"))
        except _DefenseFailed as failure:
            if self.config.on_error == "raise":
                raise failure.error from None
            reason = f"{failure.defense}: {type(failure.error).__name__}: {failure.error}"
            for report in self.reports:
                report.refused, report.error, report.refused_by = True, reason, failure.defense
            for choice in self._streamed:  # after what went out already, as the transformers streamer does
                self.on_text(choice, self.config.refusal)
            return [Completion(self.config.refusal, "content_filter", 0) for _ in range(self.n)]

    async def _around(self, chain: list[Defense]) -> list[Completion]:
        if not chain:
            return await self._innermost()
        outer, rest = chain[0], chain[1:]
        return await self._step(outer, outer.around_upstream, self, lambda: self._around(rest))

    async def _innermost(self) -> list[Completion]:
        """The engine's answers to the (transformed) conversation, streamed once no defense holds them."""
        streaming = self._job.stream and not self._holders
        return await self._engine.upstream.complete(self._body(), self.on_text if streaming else None)

    async def _step(self, defense: Defense, method: Callable, *args):
        """Run one defense method, timing it into every choice's record, tagging its failures."""
        started = time.perf_counter()
        try:
            result = method(*args)
            return await result if inspect.isawaitable(result) else result
        except (UpstreamError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a defense fails closed
            raise _DefenseFailed(defense.name, error) from error
        finally:
            for choice in range(self.n):
                self.record(defense.name, choice).time_s += time.perf_counter() - started

    def _doing(self, kind: str) -> list[Defense]:
        return [defense for defense in self.defenses if type(defense).overrides(kind)]


def _openai_messages(messages: list[dict]) -> list[dict]:
    """A job's chat messages in OpenAI's form: each image as the ``data:`` URI of the request's
    own bytes, which the server checked (never re-encoded)."""
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                {"type": "text", "text": part["text"]}
                if part["type"] == "text"
                else {"type": "image_url", "image_url": {"url": part["url"]}}
                for part in content
            ]
        converted.append({"role": message["role"], "content": content})
    return converted
