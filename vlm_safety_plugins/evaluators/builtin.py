"""Registers the built-in scorer backends, exactly as a third-party plugin would."""

from ..hookspecs import hookimpl
from .clip import ClipScorer
from .reward import RewardScorer


@hookimpl
def register_evaluators(register):
    register(ClipScorer)
    register(RewardScorer)
