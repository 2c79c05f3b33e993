"""Engine: the interface between the HTTP server and whatever generates.

The server parses and checks a request (schema, images, the policy) into a ``ChatJob`` and
admits it; the engine turns the job into events, as an async iterator: ``Delta`` text as
it is cleared (streaming jobs only) and one ``Finish`` per choice, with the final text, the
finish reason and the choice's ``SafetyReport``. Streaming and non-streaming answers are
the same events, so the streamed text always concatenates to the non-streamed one.

The engine ``transformers`` runs the attached model in-process; an upstream engine (an
OpenAI-compatible server doing the generation) implements the same interface, and says at
start, through ``check_policy``, which of the policy's defenses it cannot run.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from PIL import Image

from ...core.policy import Policy
from ...core.report import SafetyReport


@dataclass
class ChatJob:
    """One admitted request: the conversation (images decoded), sampling, the request's flags."""

    messages: list[dict]
    """Chat messages in transformers' form; image parts are ``{"type": "image", "image": PIL, "url": URI}``,
    the URI a ``data:`` URI of the request's own image bytes (what a gateway forwards)."""
    flags: dict | None
    """The request's own ``vlm_safety`` flags (None: it sent none); the engine's policy applies them."""
    max_tokens: int
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set by the server when the client went away or the request timed out."""
    started: threading.Event = field(default_factory=threading.Event)
    """Set by the engine when a generation slot took the job (the end of its queue wait)."""

    @property
    def images(self) -> list[Image.Image]:
        return [
            part["image"]
            for message in self.messages
            if not isinstance(message["content"], str)
            for part in message["content"]
            if part["type"] == "image"
        ]


@dataclass
class Delta:
    """Text of choice ``index`` that every defense has cleared (streaming jobs)."""

    index: int
    text: str


@dataclass
class Finish:
    """Choice ``index`` is done: its whole text, why it stopped, its report and token counts."""

    index: int
    text: str
    finish_reason: str  # "stop", "length" or "content_filter" (a defense replaced the answer)
    report: SafetyReport | None
    prompt_tokens: int
    completion_tokens: int


class Engine(abc.ABC):
    """Generates answers for jobs under the operator's policy."""

    name: str
    max_stream_choices: int | None = None
    """How many choices (``n``) one streaming job may ask for; None: no limit."""

    def __init__(self, model_id: str, policy: Policy):
        self.model_id, self.policy = model_id, policy

    def check_policy(self) -> None:
        """Raise ConfigError naming a defense of the policy this engine cannot run (at start).
        The default: the engine runs every defense (the in-process engine does)."""
        return None

    @abc.abstractmethod
    def chat(self, job: ChatJob) -> AsyncIterator[Delta | Finish]:
        """The job's events. Closing the iterator early cancels the job (``job.cancel``)."""

    def close(self) -> None:
        """Release what the engine holds (threads, connections); by default nothing."""
        return None
