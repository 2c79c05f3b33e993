"""The ``upstream`` engine: the operator's policy in front of any OpenAI-compatible server.

Each defense of a request's config runs where it can: in this process when it works on
the conversation and the engine's answers (``Defense.runs_in_gateway``: AdaShield, ETA),
inside the engine otherwise, sent with every upstream request as ``vllm_xargs`` (CMRM and
VLM-Guard through our vLLM plugin; the upstream's own policy names their files). What the
upstream cannot do (no plugin, no request extensions) is an error at start for the
operator's defenses and a 400 for a request's, naming the defense: never a weaker answer.
The gateway keeps no state between requests: run as many as needed behind a load balancer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import torch

from ..core import plugins
from ..core.config import SafetyConfig
from ..core.defense import DefenseInstances, Resources
from ..core.errors import AdapterError, ConfigError, GenerationCancelled
from ..core.options import options_to_dict
from ..core.policy import Policy
from ..core.report import DefenseRecord
from ..serving.engines.base import ChatJob, Delta, Engine, Finish
from ..serving.protocol import APIError, policy_violation
from .call import GatewayRequest
from .upstream import Upstream, UpstreamError, extension_fields

CANCEL_POLL_S = 0.25
OPENINGS_KEPT = 64
NEEDS = {"extensions": "vLLM's request extensions (n with top_k, continuing the assistant turn)"}
_DONE = object()


class UpstreamEngine(Engine):
    """Answers jobs with an upstream engine's generations, the policy's defenses around and inside them."""

    name = "upstream"

    def __init__(
        self,
        upstream: Upstream,
        policy: Policy,
        *,
        model_id: str | None = None,
        concurrency: int = 64,
        trust_remote_code: bool = False,
        device: str | None = None,
        tokenizer: str | None = None,
    ):
        super().__init__(model_id or upstream.model, policy)
        self.upstream, self.concurrency = upstream, concurrency
        self.resources = Resources(trust_remote_code=trust_remote_code)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.capabilities = upstream.probe()
        # engine-side options keep the artifact names a request gave: the upstream's policy maps them to its files
        self._by_name = dataclasses.replace(policy, artifacts={name: name for name in policy.artifacts})
        self._defenses = DefenseInstances(self.resources)
        self._slots = asyncio.Semaphore(concurrency)
        self._openings: dict[str, int] = {}
        self._text_checks = _text_checks(tokenizer, trust_remote_code) if tokenizer is not None else None
        """The served model's adapter, for its special tokens in text (None: no tokenizer given)."""

    def check_policy(self) -> None:
        """The operator's defenses against what the upstream can do; its engine-side ones sent once."""
        _, flags = self.split(self.policy.config, self.policy.config)
        if flags is not None:
            try:
                self.upstream.check_flags(flags)
            except UpstreamError as error:
                raise ConfigError(
                    f"the upstream refused the policy's engine-side defenses: {error.message}", path="defenses"
                ) from None

    def split(self, config: SafetyConfig, by_name: SafetyConfig) -> tuple[SafetyConfig, str | None]:
        """(the gateway-side config, the engine-side flags as JSON or None) of a resolved config;
        ``by_name`` is the same config with request-named files left as names. ConfigError naming
        a defense the upstream cannot run."""
        gateway, engine_side = {}, {}
        for name, options in config.defenses.items():
            cls = plugins.get_defense(name)
            path = f"defenses.{name}"
            if cls.runs_in_gateway():
                missing = [need for need in cls.gateway_needs(options) if not getattr(self.capabilities, need)]
                if missing:
                    raise ConfigError(
                        f"{name} needs an upstream with {NEEDS[missing[0]]}; {self.upstream.base_url} has none",
                        path=path,
                    )
                gateway[name] = options
            elif not cls.overrides("engine_work"):
                raise ConfigError(f"{name} runs neither in front of an engine nor inside one", path=path)
            elif not self.capabilities.plugin:
                raise ConfigError(
                    f"{name} runs inside the engine, and {self.upstream.base_url} runs no vlm-safety vLLM plugin "
                    "(a vLLM server with this package installed)",
                    path=path,
                )
            else:
                engine_side[name] = options_to_dict(by_name.defenses[name])
        flags = json.dumps({"defenses": engine_side}) if engine_side else None
        return dataclasses.replace(config, defenses=gateway), flags

    async def chat(self, job: ChatJob) -> AsyncIterator[Delta | Finish]:
        request = self._request(job)
        async with self._slots:
            job.started.set()
            events: asyncio.Queue = asyncio.Queue()
            request.on_text = lambda index, text: events.put_nowait(Delta(index, text))
            work = asyncio.create_task(request.run())
            work.add_done_callback(lambda _: events.put_nowait(_DONE))
            try:
                while (event := await self._next(events, job)) is not _DONE:
                    yield event
                completions = work.result()
            finally:
                work.cancel()
        for index, completion in enumerate(completions):
            report = request.reports[index] if request.config_enabled else None
            reason = "content_filter" if report is not None and report.replaced else completion.finish_reason
            yield Finish(index, completion.text, reason, report, completion.prompt_tokens, completion.completion_tokens)

    def _request(self, job: ChatJob) -> GatewayRequest:
        flags = SafetyConfig.from_dict(job.flags) if job.flags is not None else None
        try:
            config, origins = self.policy.resolve(flags)
            gateway, engine_flags = self.split(config, self._by_name.resolve(flags)[0])
        except ConfigError as error:
            raise policy_violation(error) from None
        if self._text_checks is not None:
            try:
                self._text_checks.check_conversation(job.messages)
            except AdapterError as error:
                raise APIError(400, str(error), param="messages") from None
        if job.min_tokens and not self.capabilities.extensions:
            raise APIError(400, f"min_tokens: {self.upstream.base_url} takes no min_tokens", param="min_tokens")
        request = GatewayRequest(self, job, gateway, origins, self._defenses.of(gateway), engine_flags)
        request.config_enabled = config.enabled
        for name in config.defenses:
            if name not in gateway.defenses:  # it acts inside the engine, which reports nothing back
                for choice in range(job.n):
                    request.reports[choice].defenses[name] = DefenseRecord(name, ran=True, details={"in": "engine"})
        return request

    @staticmethod
    async def _next(events: asyncio.Queue, job: ChatJob):
        """The next event, or GenerationCancelled once the server cancelled the job."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), CANCEL_POLL_S)
            except TimeoutError:
                if job.cancel.is_set():
                    raise GenerationCancelled from None

    async def opening_tokens(self, text: str) -> int:
        """Tokens of ``text`` opening an answer under the upstream's chat template (measured once)."""
        if text not in self._openings:
            base = {"model": self.upstream.model, "max_tokens": 1}
            ask = [{"role": "user", "content": "Hi"}]
            plain = await self.upstream.complete({**base, "messages": ask})
            opened = await self.upstream.complete(
                {
                    **base,
                    "messages": [*ask, {"role": "assistant", "content": text}],
                    **extension_fields(answer_opening=True),
                }
            )
            if len(self._openings) >= OPENINGS_KEPT:
                self._openings.clear()
            self._openings[text] = max(0, opened[0].prompt_tokens - plain[0].prompt_tokens)
        return self._openings[text]

    def close(self) -> None:
        self.upstream.close()


def _text_checks(tokenizer: str, trust_remote_code: bool):
    from ..core.adapters.base import processor_adapter

    try:
        return processor_adapter(tokenizer, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tokenizer {tokenizer}: cannot load its processor or tokenizer: {error}") from None
