"""The OpenAI chat-completions wire format the server speaks: request models, errors, responses.

Requests are validated by pydantic with unknown fields forbidden, so a misspelt field
(``vlm_saftey``) is a 422 naming it, never silently ignored. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` SDK turns into
its typed exceptions. Responses are plain dicts (the SDK parses them into its own models).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SEED_LIMIT = 2**32 - 1  # numpy's seed range, which transformers.set_seed feeds
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


class APIError(Exception):
    """An error answered to the client: HTTP status, message, OpenAI error type, the field, a code."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status in self.TYPES:
            return self.TYPES[self.status]
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``; ``vlm_safety`` carries the request's own flags (under the policy)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    """An extension (as vLLM's): no end of sequence before this many tokens (fixed-length benchmarks)."""
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=SEED_LIMIT)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    vlm_safety: dict[str, Any] | None = None

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_request(data: Any) -> ChatCompletionRequest:
    """The validated request, or a 422 APIError naming the bad field (``messages[0].content[1].image_url``)."""
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        # the deepest error is the specific one (a union reports each member's mismatch)
        worst = max(reversed(error.errors()), key=lambda item: len(item["loc"]))
        param = field_path(worst["loc"])
        reason = "unknown field" if worst["type"] == "extra_forbidden" else worst["msg"]
        raise APIError(422, f"{param or 'body'}: {reason}", param=param or None, code=worst["type"]) from None


def field_path(location: tuple) -> str:
    """pydantic's error location as a field path: ``messages[0].content[1].image_url.url``."""
    parts, tagged = [], False
    for part in location:
        if isinstance(part, str) and ("[" in part or part == "str"):  # a union member's label
            tagged = "tagged-union" in part
        elif isinstance(part, int):
            parts.append(f"[{part}]")
        elif tagged and parts[-1].startswith("["):  # the tag a tagged union inserts after the index
            tagged = False
        else:
            parts.append(f".{part}" if parts else part)
    return "".join(parts)


def policy_violation(error) -> APIError:
    """The 400 for a request's ``vlm_safety`` flags the policy refuses (a ConfigError), naming the key."""
    param = ".".join(["vlm_safety", *([error.path] if error.path else [])])
    return APIError(400, f"{param}: {error.reason}", param=param, code="policy_violation")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def choice_body(index: int, text: str, finish_reason: str, report: dict | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "logprobs": None,
        "vlm_safety": report,
    }


def completion_body(request_id: str, model: str, choices: list[dict], usage: dict) -> dict:
    return _envelope("chat.completion", request_id, model, choices, usage=usage)


def chunk_body(request_id: str, model: str, choices: list[dict], **extra) -> dict:
    return _envelope("chat.completion.chunk", request_id, model, choices, **extra)


def _envelope(kind: str, request_id: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
