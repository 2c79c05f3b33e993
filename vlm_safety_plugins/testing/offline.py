"""Names of the models built offline, usable wherever a checkpoint name is expected.

``--model tiny-llava``, ``clip: {model: tiny-clip}`` and ``reward_model: {path:
tiny-reward-model}`` resolve here instead of on the hub, so the CLI, configs, tests and
benchmarks run with no download. ``tiny-*`` are random (built from a seed); ``testbed*``
are the trained testbed models shipped with the package. Each entry builds its objects on call.
"""

from __future__ import annotations

from collections.abc import Callable


def _tiny_vlm(family: str) -> Callable:
    def build(seed: int = 0):
        from . import tiny_vlm

        return tiny_vlm(family, seed=seed)

    return build


def _tiny_clip(seed: int = 0):
    from . import tiny_clip

    return tiny_clip(seed=seed)


def _tiny_reward_model(seed: int = 0):
    from . import tiny_reward_model

    return tiny_reward_model(seed=seed)


def _testbed(loader: str) -> Callable:
    def load(seed: int = 0):  # trained weights: the seed does not apply
        from .. import testbed

        return getattr(testbed, loader)()

    return load


VLMS: dict[str, Callable] = {
    "tiny-llava": _tiny_vlm("llava"),
    "tiny-qwen2-vl": _tiny_vlm("qwen2_vl"),
    "tiny-gemma3": _tiny_vlm("gemma3"),
    "testbed": _testbed("load_vlm"),
}
"""name -> build(seed) returning ``(model, processor)``."""

CLIPS: dict[str, Callable] = {"tiny-clip": _tiny_clip, "testbed-clip": _testbed("load_clip")}
"""name -> build(seed) returning open_clip's ``(model, preprocess, tokenizer)``."""

REWARD_MODELS: dict[str, Callable] = {
    "tiny-reward-model": _tiny_reward_model,
    "testbed-reward-model": _testbed("load_reward_model"),
}
"""name -> build(seed) returning ``(model, tokenizer)``."""
