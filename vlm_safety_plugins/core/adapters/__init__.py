"""Model adapters: what a VLM family looks like inside, behind one small interface."""

from ..lazy import lazy_exports

__all__ = ["ModelAdapter", "find_adapter"]
__getattr__, __dir__ = lazy_exports(__name__, {"ModelAdapter": ".base", "find_adapter": ".base"})
