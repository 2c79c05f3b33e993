"""Prefix caching salted per steering configuration, through vLLM's own ``cache_salt``.

vLLM reuses a cached KV block only for a request with the same ``cache_salt``. A request whose
defenses steer gets a salt derived from its steering configuration as the operator's policy
resolves it, so KV computed under one steering is never reused under another one, nor by an
unsteered request, and requests steered alike still share theirs. A client's own salt is kept,
joined with ours. A logits processor cannot set a request's salt, so:

- in process, ``cache_salt(extra_args)`` gives it for the prompt (``{"prompt": ..., "cache_salt": ...}``);
- ``vllm serve`` takes ``--middleware vlm_safety_plugins.vllm.salt.CacheSaltMiddleware``, which
  sets it on every chat and completion request from the request's ``vllm_xargs``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError
from . import requests

SALTED_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_SALT = 128  # vLLM refuses a longer cache_salt


def cache_salt(extra_args: Mapping[str, Any] | None) -> str | None:
    """The salt of a request's steering (None: it does not steer, or its flags are refused anyway)."""
    try:
        config = requests.resolved_config(extra_args)
        work = requests.resolved_work(config)
    except ConfigError:  # validate_params answers it with a 400
        return None
    if work is None or work.steering is None:
        return None
    return _salt(config.cache_key())


def _salt(text: str) -> str:
    return "vlm-safety:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def salted_body(body: bytes) -> bytes | None:
    """The request body with its ``cache_salt`` set for its steering; None to leave it as it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("vllm_xargs") or {}, dict):
        return None
    salt = cache_salt(data.get("vllm_xargs"))
    if salt is None:
        return None
    own = data.get("cache_salt")
    if isinstance(own, str) and own:  # both kept: a joined one, hashed where it passes vLLM's 128 characters
        salt = f"{own}|{salt}" if len(own) + 1 + len(salt) <= MAX_SALT else _salt(f"{own}|{salt}")
    data["cache_salt"] = salt
    return json.dumps(data).encode()


class CacheSaltMiddleware:
    """ASGI middleware for vLLM's OpenAI server: salts the prefix cache of steered requests."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in SALTED_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to salt
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        salted = salted_body(body)
        if salted is not None:
            body = salted
            headers = [(key, value) for key, value in scope["headers"] if key.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], then=None):
    """An ASGI ``receive`` that gives ``messages``, then defers to ``then`` (disconnect polling)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
