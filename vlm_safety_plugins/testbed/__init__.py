"""A trained testbed where image-induced safety degradation is real, so defenses can be measured offline.

Real VLM weights cannot be downloaded on test machines, and random tiny models
(:mod:`vlm_safety_plugins.testing`) only show that a defense's hooks fire. The testbed is
a small synthetic world (:mod:`.world`) and three small models trained on it, shipped as
safetensors under ``weights/`` (retrain: ``python -m vlm_safety_plugins.testbed.train``):

- ``testbed``: a LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``) that refuses
  harmful requests given as text ("As an AI assistant, I cannot help ..."), complies with
  them once any image is attached or when the request is written in the image, and
  answers questions about scenes of shapes correctly;
- ``testbed-clip``: an open_clip CLIP whose cosine with ETA's safety prompt is >= 0.16 for
  harmful-concept and harmful typographic images and below it for harmless ones;
- ``testbed-reward-model``: a sequence-classification reward model scoring refusals and
  harmless answers around +1 and compliance with harmful requests around -1.

Each loader returns what its :mod:`~vlm_safety_plugins.testing` counterpart returns, in
float32 and eval mode, offline.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["NAMES", "WEIGHTS", "load_clip", "load_reward_model", "load_vlm"]

WEIGHTS = Path(__file__).parent / "weights"
"""Directory of the trained weights: ``vlm/``, ``clip/``, ``reward_model/``."""

NAMES = {"testbed": "vlm", "testbed-clip": "clip", "testbed-reward-model": "reward_model"}
"""Model name (as the CLI and configs spell it) -> its subdirectory of :data:`WEIGHTS`."""


def load_vlm(path: str | Path | None = None):
    """``(model, processor)``: the testbed LLaVA and its processor (greedy decoding by default)."""
    from .vlm import load

    return load(Path(path) if path else WEIGHTS / NAMES["testbed"])


def load_clip(path: str | Path | None = None):
    """``(model, preprocess, tokenizer)`` of the testbed open_clip CLIP, like ``create_model_and_transforms``."""
    from .clip_model import load

    return load(Path(path) if path else WEIGHTS / NAMES["testbed-clip"])


def load_reward_model(path: str | Path | None = None):
    """``(model, tokenizer)``: the testbed reward model (``logits[:, 0]`` is the score) and its tokenizer."""
    from .reward_model import load

    return load(Path(path) if path else WEIGHTS / NAMES["testbed-reward-model"])
