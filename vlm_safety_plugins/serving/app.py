"""The OpenAI-compatible HTTP app (FastAPI) in front of an engine, under the operator's policy.

``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /health`` and
``GET /metrics``. A request is checked whole before it is admitted (body size, schema,
model, token budget, images, the policy on its ``vlm_safety`` flags), then waits for a
generation slot in a bounded queue (503 when full). A request that outlives its timeout,
or whose client disconnects, has its generation cancelled; neither is ever counted, or
answered, as a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.config import SafetyConfig, parse_json
from ..core.errors import ConfigError, GenerationCancelled, VLMSafetyError
from . import protocol
from .engines.base import ChatJob, Delta, Engine, Finish
from .images import ImageLimits, load_image
from .metrics import ServerMetrics
from .protocol import APIError

logger = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25
API_KEY_ENV = "VLM_SAFETY_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """What the operator sets at start (``vlm-safety serve`` options)."""

    api_key: str | None = None
    images: ImageLimits = field(default_factory=ImageLimits)
    max_body_bytes: int = 32 * 2**20
    max_queue: int = 64
    """Requests that may wait for a generation slot; more are answered 503."""
    request_timeout_s: float = 600.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    server = _Server(engine, settings or ServerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="vlm-safety-plugins", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = {"Retry-After": "1"} if error.code == "queue_full" else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.exception("unexpected error answering %s", request.url.path)
        body = APIError(500, f"internal error: {type(error).__name__}", code="internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "engine": engine.name}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        card = {"id": engine.model_id, "object": "model", "created": server.started, "owned_by": "vlm-safety-plugins"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_key(request)
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(request)

    return app


class _Server:
    """The app's state: engine, settings, metrics, and the jobs admitted now."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = ServerMetrics()
        self.started = int(time.time())
        self.jobs: dict[int, ChatJob] = {}
        self.metrics.in_flight.set_function(lambda: len(self.jobs))
        self.metrics.queue_depth.set_function(lambda: sum(not job.started.is_set() for job in list(self.jobs.values())))

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the operator's API key (when one is set)."""
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")

    # -- a chat completion ------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            self.check_key(request)
            chat = protocol.parse_request(_parse_json(await self._body(request)))
            job = await run_in_threadpool(self._job, chat)
            self._admit(job)
        except APIError:
            self.metrics.requests.labels("rejected").inc()
            raise
        request_id = protocol.completion_id()
        events = self.engine.chat(job)
        if not chat.stream:
            return await self._complete(job, events, request, request_id, arrived)
        try:  # the first event before any header: an error before output is a plain HTTP error
            first = await self._watched(anext(events, None), job, request, arrived)
        except BaseException as error:
            await self._end(job, events, _outcome(error), arrived)
            raise _as_api_error(error) from None
        return StreamingResponse(
            self._stream(job, events, first, request_id, chat, arrived),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _complete(self, job, events, request, request_id, arrived) -> Response:
        outcome = "failed"
        try:
            finishes = await self._watched(_finishes(events), job, request, arrived)
            outcome = "completed"
        except BaseException as error:
            outcome = _outcome(error)
            raise _as_api_error(error) from None
        finally:
            await self._end(job, events, outcome, arrived)
        for finish in finishes:
            self.metrics.record(finish.report)
        choices = [
            protocol.choice_body(finish.index, finish.text, finish.finish_reason, _report(finish))
            for finish in finishes
        ]
        body = protocol.completion_body(request_id, self.engine.model_id, choices, _usage(finishes))
        return JSONResponse(body)

    async def _stream(self, job, events, first, request_id, chat, arrived) -> AsyncIterator[str]:
        model, outcome, sent, finishes = self.engine.model_id, "failed", {}, []

        def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse(protocol.chunk_body(request_id, model, [choice]))

        try:
            for index in range(job.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            event = first
            while event is not None:
                if isinstance(event, Delta):
                    sent[event.index] = sent.get(event.index, "") + event.text
                    yield chunk(event.index, {"content": event.text})
                else:
                    finishes.append(event)
                    streamed = sent.get(event.index, "")
                    rest = event.text[len(streamed) :] if event.text.startswith(streamed) else ""
                    if rest:
                        yield chunk(event.index, {"content": rest})
                    yield chunk(event.index, {}, event.finish_reason)
                    self.metrics.record(event.report)
                async with asyncio.timeout(self._remaining(arrived)):
                    event = await anext(events, None)
            extra = {"vlm_safety": [_report(finish) for finish in sorted(finishes, key=lambda item: item.index)]}
            if chat.stream_options and chat.stream_options.include_usage:
                extra["usage"] = _usage(finishes)
            yield _sse(protocol.chunk_body(request_id, model, [], **extra))
            yield "data: [DONE]\n\n"
            outcome = "completed"
        except BaseException as error:
            outcome = _outcome(error)
            if outcome == "cancelled" and not isinstance(error, GenerationCancelled):
                raise  # the client is gone (the response task was cancelled): nothing to send
            yield _sse(_as_api_error(error).body())
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()
            await self._end(job, events, outcome, arrived)

    # -- steps --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        return bytes(body)

    def _job(self, chat: protocol.ChatCompletionRequest) -> ChatJob:
        """The checked job of a parsed request (runs in a thread: images decode here)."""
        engine, settings = self.engine, self.settings
        if chat.model != engine.model_id:
            message = f"model {chat.model!r} is not served here; this server serves {engine.model_id!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        max_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
            raise APIError(422, f"{param}: at most {settings.max_tokens_limit} on this server", param=param)
        if chat.min_tokens > max_tokens:
            raise APIError(422, f"min_tokens: more than the answer's {max_tokens} tokens at most", param="min_tokens")
        if chat.stream and engine.max_stream_choices is not None and chat.n > engine.max_stream_choices:
            message = (
                f"n: the {engine.name} engine streams {engine.max_stream_choices} choice; use stream=false for more"
            )
            raise APIError(400, message, param="n")
        self._check_flags(chat.vlm_safety)
        return ChatJob(
            messages=self._messages(chat),
            flags=chat.vlm_safety,
            max_tokens=max_tokens,
            min_tokens=chat.min_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            stop=chat.stop_sequences(),
            n=chat.n,
            stream=chat.stream,
        )

    def _check_flags(self, flags: dict | None) -> None:
        """The policy's verdict on the request's flags, as a 400 naming the key."""
        try:
            self.engine.policy.resolve(SafetyConfig.from_dict(flags) if flags is not None else None)
        except ConfigError as error:
            raise protocol.policy_violation(error) from None

    def _messages(self, chat: protocol.ChatCompletionRequest) -> list[dict]:
        """The conversation in transformers' chat form, images decoded (at most ``max_images``)."""
        limits, messages, count = self.settings.images, [], 0
        for at, message in enumerate(chat.messages):
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                messages.append({"role": role, "content": message.content})
                continue
            parts = []
            for part_at, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                count += 1
                param = f"messages[{at}].content[{part_at}].image_url.url"
                if count > limits.max_images:
                    message = f"{param}: at most {limits.max_images} images per request"
                    raise APIError(413, message, param=param, code="too_many_images")
                image, source = load_image(part.image_url.url, limits, param)
                parts.append({"type": "image", "image": image, "url": source})
            messages.append({"role": role, "content": parts})
        return messages

    def _admit(self, job: ChatJob) -> None:
        limit = self.engine.concurrency + self.settings.max_queue
        if len(self.jobs) >= limit:
            message = f"the server is at capacity ({limit} requests in flight); retry later"
            raise APIError(503, message, code="queue_full")
        self.jobs[id(job)] = job

    async def _watched(self, awaitable, job: ChatJob, request: Request, arrived: float):
        """Await ``awaitable`` under the request's timeout, cancelling the job if the client leaves."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async with asyncio.timeout(self._remaining(arrived)):
                return await awaitable
        finally:
            watcher.cancel()

    def _remaining(self, arrived: float) -> float:
        return max(0.0, self.settings.request_timeout_s - (time.perf_counter() - arrived))

    async def _end(self, job: ChatJob, events, outcome: str, arrived: float) -> None:
        job.cancel.set()
        with contextlib.suppress(BaseException):
            await events.aclose()
        self.jobs.pop(id(job), None)
        self.metrics.requests.labels(outcome).inc()
        if outcome == "completed":
            self.metrics.request_seconds.observe(time.perf_counter() - arrived)


async def _finishes(events) -> list[Finish]:
    return [event async for event in events if isinstance(event, Finish)]


async def _cancel_on_disconnect(request: Request, job: ChatJob) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    job.cancel.set()


def _parse_json(body: bytes):
    try:
        return parse_json(body)
    except ValueError as error:  # JSONDecodeError, bad UTF-8, NaN/Infinity
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None


def _outcome(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed_out"
    if isinstance(error, (GenerationCancelled, asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    if isinstance(error, APIError) and error.status >= 500:  # an upstream engine failed
        return "failed"
    return "rejected" if isinstance(error, (APIError, VLMSafetyError)) else "failed"


def _as_api_error(error: BaseException) -> APIError:
    """What the client is told about an error after admission."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, TimeoutError):
        return APIError(503, "the request took longer than the server's request timeout", code="timeout")
    if isinstance(error, (GenerationCancelled, asyncio.CancelledError)):
        return APIError(499, "the request was cancelled", code="cancelled")
    if isinstance(error, VLMSafetyError):  # the request's content (a special token, an image the processor refused)
        return APIError(400, str(error), code=type(error).__name__)
    logger.error("generation failed", exc_info=error)
    return APIError(500, f"generation failed: {type(error).__name__}", code="generation_failed")


def _report(finish: Finish) -> dict | None:
    return finish.report.to_dict() if finish.report is not None else None


def _usage(finishes: list[Finish]) -> dict:
    prompt = finishes[0].prompt_tokens if finishes else 0
    return protocol.usage_body(prompt, sum(finish.completion_tokens for finish in finishes))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, default=str)}\n\n"
