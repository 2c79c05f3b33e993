"""Registers the built-in scorers, exactly as a third-party plugin would (imports inside the hook)."""

from ..core.hookspecs import hookimpl


@hookimpl
def register_evaluators(register):
    from .clip import ClipScorer
    from .reward import RewardScorer

    register(ClipScorer)
    register(RewardScorer)
