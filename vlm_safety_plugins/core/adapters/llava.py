"""LLaVA (llava-hf 1.5 layout): CLIP vision tower, projector, Llama decoder."""

from .base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """llava-hf checkpoints; ``pixel_values`` are whole normalised images, so raw images rebuild."""

    name = "llava"
    model_types = ("llava",)
    thread_safe = True
