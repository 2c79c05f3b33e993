"""Model adapters: what a VLM family looks like inside, behind one small interface."""

from .base import ModelAdapter, find_adapter

__all__ = ["ModelAdapter", "find_adapter"]
