"""The scorer contract: the ``Evaluator`` base class and one Protocol per kind of score.

Scorers are registered with ``register_evaluators`` and chosen by ``name`` in a
defense's options (e.g. ``clip.evaluator``, ``reward_model.evaluator``); ``kind`` says what
they score, so a defense can check it was given the right sort of scorer. A defense codes
against the Protocol of the kind it asks for; a third-party scorer implements it (it need
not subclass anything but ``Evaluator``, which carries the registration attributes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

KINDS = ("image_safety", "reward")


class Evaluator:
    """Subclass, set ``name``, ``kind`` and ``description``, and implement the kind's Protocol."""

    name: ClassVar[str]
    kind: ClassVar[str]  # one of KINDS, or a new kind a third-party defense defines
    description: ClassVar[str] = ""


@runtime_checkable
class ImageSafetyScorer(Protocol):
    """Kind ``image_safety`` (the built-in ``clip``): images and texts in one embedding space."""

    @classmethod
    def load(cls, backend: str, model: str, pretrained: str | None, device: str | None) -> ImageSafetyScorer:
        """Load the scorer (a checkpoint name or path, or an offline model name)."""

    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-norm (n, d) embeddings of PIL images."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm (n, d) embeddings of texts."""

    def similarity(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Cosines of every row of the first embeddings with every row of the second (n × m)."""

    def safety_scores(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(n,) cosine of each image with the unsafe-content prompt: higher is less safe."""


@runtime_checkable
class ResponseRewardScorer(Protocol):
    """Kind ``reward`` (the built-in ``reward_model``): a score per (instruction, response) pair."""

    @classmethod
    def load(cls, path: str, *, trust_remote_code: bool, max_length: int, device: str | None) -> ResponseRewardScorer:
        """Load the scorer (a checkpoint name or path, or an offline model name); defenses may also
        pass ``dtype`` (a torch dtype) when their options name one."""

    def score(self, instructions: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(n,) float scores, higher is safer."""
