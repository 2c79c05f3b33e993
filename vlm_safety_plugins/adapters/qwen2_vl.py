"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower, Qwen2 decoder, M-RoPE."""

from ..hookspecs import hookimpl
from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL.

    The number of image tokens follows the image's size, so a corrupted image keeps the
    real one's size (CMRM compares the two views at matching cost). ``pixel_values`` are
    flattened patches, so raw images are not rebuilt: pass ``images=`` to generate.
    """

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def corruption_size(self, image):
        return image.size

    def select_cached_rows(self, rows):
        # The M-RoPE offset of each row of the last prefill; decode steps add it to their positions.
        inner = self.base_model.model
        if getattr(inner, "rope_deltas", None) is not None and inner.rope_deltas.shape[0] > 1:
            inner.rope_deltas = inner.rope_deltas[list(rows)]


@hookimpl
def register_model_adapters(register):
    register(Qwen2VLAdapter)
