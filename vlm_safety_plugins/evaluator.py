"""Evaluator: the base class of scorer backends (image safety, response reward, ...).

Evaluators are registered with ``register_evaluators`` and chosen by ``name`` in a
defense's options (ETA: ``clip.evaluator``, ``reward_model.evaluator``); ``kind`` says
what they score, so a defense can check it was given the right sort of scorer. What a
defense calls depends on the kind:

- ``image_safety`` (the built-in ``clip``): ``load(backend, model, pretrained, device)``;
  ``embed_images(images)`` and ``embed_texts(texts)`` -> unit-norm (n, d) tensors;
  ``similarity(image_embeddings, text_embeddings)`` -> cosines;
  ``safety_scores(image_embeddings)`` -> (n,) cosine with the safety prompt.
- ``reward`` (the built-in ``reward_model``): ``load(path, *, trust_remote_code,
  max_length, device)``; ``score(instructions, responses)`` -> (n,) float tensor, higher
  is safer.
"""

from typing import ClassVar

KINDS = ("image_safety", "reward")


class Evaluator:
    """Subclass, set ``name``, ``kind`` and ``description``, and implement the kind's methods."""

    name: ClassVar[str]
    kind: ClassVar[str]  # one of KINDS, or a new kind a third-party defense defines
    description: ClassVar[str] = ""
