"""Scorers: image-safety scores (``ClipScorer``, CLIP through open_clip or transformers) and
response rewards (``RewardScorer``, any sequence-classification reward model).

Both load real checkpoints by name or local path, or wrap objects the caller already
built (the tiny test models included). Loading failures raise ``ModelLoadError``, whose
message names what was being loaded and why it failed, instead of a library's deep
traceback. ``base.py`` holds the scorer contract that defenses rely on.
"""

from ..core.lazy import lazy_exports

__all__ = ["ClipScorer", "Evaluator", "ImageSafetyScorer", "ModelLoadError", "RewardScorer", "ResponseRewardScorer"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ClipScorer": ".clip",
        "RewardScorer": ".reward",
        "ModelLoadError": "..core.errors",
        "Evaluator": ".base",
        "ImageSafetyScorer": ".base",
        "ResponseRewardScorer": ".base",
    },
)
