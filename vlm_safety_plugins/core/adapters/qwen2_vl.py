"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower, Qwen2 decoder, M-RoPE."""

import torch
from PIL import Image

from ..errors import DefenseError
from .base import ModelAdapter

TYPICAL_SIDE = 448  # px: Qwen2-VL's usual input size, 16 × 16 merged patches


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL.

    The number of image tokens follows the image's size, so a corrupted image keeps the
    real one's size (steering defenses compare the two views at matching cost). ``pixel_values`` are
    flattened patches; raw images are rebuilt from them at the size the processor resized them to.
    M-RoPE offsets are computed per call for continuations, never read from the shared model
    (transformers keeps the last prefill's ``rope_deltas`` on it, which concurrent calls overwrite).
    """

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    thread_safe = True

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

    def continuation_inputs(self, prompt, rows, inputs):
        """Explicit M-RoPE ``position_ids``: text positions plus each call row's offset, as transformers'
        ``_prepare_position_ids_for_generation`` builds them from ``model.rope_deltas``, but from this
        call's own prompt (an image's grid shifts every later position)."""
        ids = prompt["input_ids"]
        grids = {name: prompt[name] for name in ("image_grid_thw", "video_grid_thw") if prompt.get(name) is not None}
        if grids and prompt.get("mm_token_type_ids") is not None:
            extra = {name: value for name, value in prompt.items() if name != "input_ids"}
            _, deltas = self.base_model.model.get_rope_index(ids, **extra)
        else:
            deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return {"position_ids": text[None] + deltas[list(rows)].to(text.device)}

    def rebuild_images(self, inputs):
        """Raw images per row from the flattened patches, at the size the processor resized them to.

        Undoes the image processor's ``patchify`` (patches ordered by merge block, each holding
        channel × temporal copy × patch × patch values) and its normalisation.
        """
        pixels, grids = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is None or grids is None or pixels.dim() != 2:
            raise DefenseError(
                f"{type(self.base_model).__name__}: this defense needs the raw images; "
                "pass images=[...] to generate (one per row)"
            )
        processor = self.processor.image_processor
        patch, merge = int(processor.patch_size), int(processor.merge_size)
        temporal = int(processor.temporal_patch_size)
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        scale = float(getattr(processor, "rescale_factor", 1 / 255))
        pictures, start = [], 0
        for frames, height, width in grids.tolist():
            block = pixels[start : start + frames * height * width].float().cpu()
            start += frames * height * width
            block = block.view(frames, height // merge, width // merge, merge, merge, 3, temporal, patch, patch)
            # first frame, first temporal copy -> (channel, rows of blocks, row in block, pixel row, columns ...)
            planes = block[0, :, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6).reshape(3, height * patch, width * patch)
            array = ((planes * std + mean) / scale).clamp(0, 255).round().byte()
            pictures.append(Image.fromarray(array.permute(1, 2, 0).numpy()))
        pictures = iter(pictures)
        return [[next(pictures) for _ in range(count)] for count in self.image_runs(inputs["input_ids"]).tolist()]
