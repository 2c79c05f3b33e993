"""The upstream engine as the gateway speaks to it: HTTP (``httpx2``), what the engine can do, its errors.

An upstream is any OpenAI-compatible server. What the gateway may ask of it beyond the
standard API is probed once at start (``probe``), never assumed:

- ``extensions``: vLLM's request extensions, which ETA's alignment needs: ``n`` answers
  sampled with ``top_k``, an answer that continues the assistant turn
  (``continue_final_message``), stop strings kept in the answer, the answer's token ids.
- ``plugin``: our vLLM plugin (the logits processor and the steering hooks), which the
  engine-side defenses need: a request whose ``vllm_xargs`` misspell a config key is
  answered 400 naming the key; an engine without the plugin ignores ``vllm_xargs`` (vLLM)
  or refuses the field (others).
- ``add_special_tokens``: whether to ask for the tokenizer's BOS on every request. vLLM
  tokenizes a rendered chat template without special tokens; the transformers processor
  adds the BOS to a template that does not write it (llava-hf's does not). Where the
  upstream's chat prompt lacks the one leading token ``add_special_tokens`` would add, the
  gateway asks for it, so the engine sees the prompt transformers builds, the one the
  defenses were calibrated and tested on; where the template writes the BOS, it does not
  (never a double BOS).

An upstream that fails (unreachable, dies mid-answer, answers 5xx) is a 502, one that is
overloaded a 503: never an answer the defenses did not see. Requests go out as plain JSON
(an SDK's request and response models cost milliseconds per request, which a gateway pays
on every one) and streams are read as server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx2

from ..core.config import GENERATION_CONFIG_KEY
from ..core.defense import Completion
from ..serving.protocol import APIError

REQUEST_ERRORS = (400, 404, 413, 422)
"""Upstream statuses about the request, passed on; any other failure of the upstream is a 502."""
PROBE_MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
MISSPELT_FLAGS = json.dumps({"defences": {}})
"""A safety config with a misspelt key: our vLLM plugin answers 400 naming ``defences``."""


@dataclass(frozen=True)
class Capabilities:
    """What the upstream was found to do at start (module docstring)."""

    extensions: bool
    plugin: bool
    add_special_tokens: bool


class UpstreamError(APIError):
    """The upstream failed to answer: 502 (failed, unreachable, cancelled, refused the gateway's
    key) or 503 (overloaded), or its refusal of the request's content (``REQUEST_ERRORS``), its
    message passed on."""


class Upstream:
    """One OpenAI-compatible server and the model it serves."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        options = {
            "base_url": self.base_url,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            "timeout": httpx2.Timeout(timeout, connect=10.0),
        }
        self._sync = httpx2.Client(**options)
        self.http = httpx2.AsyncClient(**options, limits=httpx2.Limits(max_connections=None))
        self.model = model or self._only_model()

    def _only_model(self) -> str:
        try:
            served = [card["id"] for card in self._checked(self._sync.get("/models")).json()["data"]]
        except (httpx2.HTTPError, UpstreamError, ValueError, KeyError, TypeError) as error:
            raise UpstreamError(502, f"the upstream {self.base_url} did not list its models: {error}") from None
        if len(served) != 1:
            raise UpstreamError(502, f"the upstream serves {served or 'no model'}; name one with --upstream-model")
        return served[0]

    # -- at start ------------------------------------------------------------------------------

    def probe(self) -> Capabilities:
        """What the upstream can do (one-token requests)."""
        body = {"model": self.model, "messages": PROBE_MESSAGES, "n": 2, "max_tokens": 1, "temperature": 1.0}
        body.update(extension_fields(choices=2, top_k=2, answer_opening=True))
        try:
            extensions = len(self._post(body)["choices"]) == 2
        except UpstreamError as error:
            if error.status >= 500:
                raise UpstreamError(502, f"the upstream {self.base_url} did not answer: {error.message}") from None
            extensions = False
        try:
            self.check_flags(MISSPELT_FLAGS)
            plugin = False
        except UpstreamError as error:
            plugin = error.status == 400 and "defences" in error.message
        return Capabilities(extensions, plugin, extensions and self._prompt_lacks_bos())

    def _prompt_lacks_bos(self) -> bool:
        """Whether asking for special tokens adds exactly one leading token the chat prompt lacks."""
        body = {"model": self.model, "messages": PROBE_MESSAGES[:1], "max_tokens": 1, "return_token_ids": True}
        try:
            plain, special = (
                self._post({**body, "add_special_tokens": added}).get("prompt_token_ids") or []
                for added in (False, True)
            )
        except UpstreamError as error:
            if error.status >= 500:
                raise
            return False  # it refused the fields: it gets the prompt it builds
        return len(special) == len(plain) + 1 and special[1:] == plain and special[:1] != plain[:1]

    def check_flags(self, flags: str) -> None:
        """Send ``flags`` (a JSON safety config) on a one-token request; UpstreamError if refused."""
        body = {"model": self.model, "messages": PROBE_MESSAGES[:1], "max_tokens": 1}
        self._post({**body, "vllm_xargs": {GENERATION_CONFIG_KEY: flags}})

    def _post(self, body: dict) -> dict:
        try:
            return self._checked(self._sync.post("/chat/completions", json=body)).json()
        except httpx2.HTTPError as error:
            raise UpstreamError(502, f"the upstream failed: {type(error).__name__}: {error}") from None

    @staticmethod
    def _checked(response) -> httpx2.Response:
        if response.status_code >= 400:
            raise _upstream_error(response.status_code, _message(response))
        return response

    # -- per request ---------------------------------------------------------------------------

    async def complete(self, body: dict, on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """The upstream's answers to a chat-completions ``body``; with ``on_text``, streamed, each
        piece of text passed on as it comes (choice index, text)."""
        try:
            if on_text is None:
                response = self._checked(await self.http.post("/chat/completions", json=body))
                return _completions(response.json())
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with self.http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._checked(response)
                return await _streamed(_events(response), on_text)
        except UpstreamError:
            raise
        except (httpx2.HTTPError, ValueError, KeyError, TypeError) as error:  # broke, or not the API's shape
            raise UpstreamError(502, f"the upstream failed mid-answer: {type(error).__name__}: {error}") from None

    def close(self) -> None:
        """Close the start-time client (the async one's connections end with the event loop)."""
        self._sync.close()


def extension_fields(
    *, choices: int = 1, top_k: int | None = None, answer_opening: bool = False, stops: bool = False
) -> dict:
    """vLLM's request extensions (fields beside the standard ones) for the gateway's requests;
    each choice's token ids only where there are several (one choice's count is the usage's)."""
    fields: dict = {"return_token_ids": True} if choices > 1 else {}
    if top_k is not None:
        fields["top_k"] = top_k
    if answer_opening:
        fields.update(continue_final_message=True, add_generation_prompt=False)
    if stops:
        fields["include_stop_str_in_output"] = True
    return fields


def _completions(data: dict) -> list[Completion]:
    usage = data.get("usage") or {}
    choices = sorted(data["choices"], key=lambda choice: choice["index"])
    total = usage.get("completion_tokens", 0)
    return [
        Completion(
            choice["message"].get("content") or "",
            choice.get("finish_reason") or "stop",
            len(choice["token_ids"]) if choice.get("token_ids") is not None else total // max(1, len(choices)),
            usage.get("prompt_tokens", 0),
            _stop_string(choice),
        )
        for choice in choices
    ]


async def _events(response) -> AsyncIterator[dict]:
    """The JSON events of a server-sent-events response, up to ``[DONE]``; an error event raises."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise UpstreamError(502, f"the upstream failed mid-answer: {message}", code="upstream_failed")
        yield event


async def _streamed(events: AsyncIterator[dict], on_text: Callable[[int, str], None]) -> list[Completion]:
    texts: dict[int, list[str]] = {}
    finishes: dict[int, tuple[str, str | None]] = {}
    tokens: dict[int, int] = {}
    usage: dict = {}
    async for chunk in events:
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            index, piece = choice["index"], (choice.get("delta") or {}).get("content") or ""
            texts.setdefault(index, []).append(piece)
            tokens[index] = tokens.get(index, 0) + len(choice.get("token_ids") or ())
            if piece:
                on_text(index, piece)
            if choice.get("finish_reason"):
                finishes[index] = (choice["finish_reason"], _stop_string(choice))
    if not texts or set(texts) - set(finishes):
        raise UpstreamError(502, "the upstream ended its stream before every answer was finished")
    total = usage.get("completion_tokens", 0)
    return [
        Completion(
            "".join(texts[index]),
            finishes[index][0],
            tokens[index] or total // len(texts),
            usage.get("prompt_tokens", 0),
            finishes[index][1],
        )
        for index in sorted(texts)
    ]


def _stop_string(choice: dict) -> str | None:
    stop = choice.get("stop_reason")
    return stop if isinstance(stop, str) else None


def _upstream_error(status: int, message: str) -> UpstreamError:
    """What the client is told when the upstream failed or refused."""
    if status in (429, 503):
        return UpstreamError(503, f"the upstream is overloaded: {message}", code="upstream_unavailable")
    if status in REQUEST_ERRORS:  # the request's own content (too long a prompt, a bad image)
        return UpstreamError(status, f"upstream: {message}", code="upstream_refused")
    return UpstreamError(502, f"the upstream failed ({status}): {message}", code="upstream_failed")


def _message(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    inner = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return inner["message"]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(body)[:500]
