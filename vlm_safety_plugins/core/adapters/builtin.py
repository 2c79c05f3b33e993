"""Registers the built-in model adapters, exactly as a third-party plugin would.

The generic, chat-template-based ``ModelAdapter`` serves any family without its own
class; the family classes override only what differs. Imports happen inside the hook, so
loading the plugin registry stays cheap until an adapter is needed.
"""

from ..hookspecs import hookimpl


@hookimpl
def register_model_adapters(register):
    from .base import ModelAdapter
    from .gemma3 import Gemma3Adapter
    from .llava import LlavaAdapter
    from .qwen2_vl import Qwen2VLAdapter

    for adapter in (ModelAdapter, LlavaAdapter, Qwen2VLAdapter, Gemma3Adapter):
        register(adapter)
