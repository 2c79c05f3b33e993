"""Gemma 3: SigLIP vision tower, pooled soft image tokens, Gemma 3 decoder."""

from .base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    """Gemma 3 image-text checkpoints; the processor takes one list of images per text."""

    name = "gemma3"
    model_types = ("gemma3",)
    thread_safe = True

    def images_argument(self, images):
        return images if any(images) else None
