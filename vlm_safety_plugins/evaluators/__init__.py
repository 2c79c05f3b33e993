"""Scorer backends used by ETA: CLIP image safety (``ClipScorer``) and reward models (``RewardScorer``).

Both load real checkpoints by name or local path, or wrap objects the caller already
built (the tiny test models included). Loading failures raise ``ModelLoadError``,
whose message names what was being loaded and why it failed, instead of a library's
deep traceback.
"""

from ..errors import ModelLoadError
from .clip import ClipScorer
from .reward import RewardScorer

__all__ = ["ClipScorer", "ModelLoadError", "RewardScorer"]
