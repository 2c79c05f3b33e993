"""Evaluator: the base class of scorer backends (image safety, response reward, ...).

Evaluators are registered with ``register_evaluators`` and looked up by ``name`` from a
defense's options; ``kind`` says what they score, so a defense can check it was given the
right sort of scorer.
"""

from typing import ClassVar


class Evaluator:
    """Subclass, set ``name``, ``kind`` and ``description``; scoring methods depend on the kind."""

    name: ClassVar[str]
    kind: ClassVar[str]  # e.g. "image_safety", "reward"
    description: ClassVar[str] = ""
