"""Registers the generic, chat-template-based adapter (used when no family adapter matches)."""

from ..hookspecs import hookimpl
from .base import ModelAdapter


@hookimpl
def register_model_adapters(register):
    register(ModelAdapter)
