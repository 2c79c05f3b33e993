"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower, Qwen2 decoder, M-RoPE."""

from .base import ModelAdapter

TYPICAL_SIDE = 448  # px: Qwen2-VL's usual input size, 16 × 16 merged patches


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL.

    The number of image tokens follows the image's size, so a corrupted image keeps the
    real one's size (steering defenses compare the two views at matching cost). ``pixel_values`` are
    flattened patches, so raw images are not rebuilt: pass ``images=`` to generate.
    """

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def corruption_size(self, image):
        return image.size

    def image_size(self):
        """A typical square input: 448² pixels clamped to the processor's pixel budget, whole patches.

        The processor's ``size`` holds pixel *areas* (``shortest_edge`` = min_pixels,
        ``longest_edge`` = max_pixels), not sides, so the generic reading does not apply.
        """
        processor = self.processor.image_processor
        size = dict(processor.size) if processor.size is not None else {}
        low, high = size.get("shortest_edge") or 56 * 56, size.get("longest_edge") or 28 * 28 * 1280
        unit = int(getattr(processor, "patch_size", 14)) * int(getattr(processor, "merge_size", 2))
        side = max(unit, round(min(max(TYPICAL_SIDE**2, low), high) ** 0.5 / unit) * unit)
        return side, side

    def select_cached_rows(self, rows):
        # The M-RoPE offset of each row of the last prefill; decode steps add it to their positions.
        inner = self.base_model.model
        if getattr(inner, "rope_deltas", None) is not None and inner.rope_deltas.shape[0] > 1:
            inner.rope_deltas = inner.rope_deltas[list(rows)]
