"""CLIP image-safety and image-text similarity scores (ETA's pre-generation evaluator and utility guide).

The pre-generation score of an image is the cosine between its CLIP embedding and the
embedding of one fixed safety prompt (docs/defenses/eta.md); best-of-N adds the cosine
between the image and each candidate sentence (1.5). Images are embedded once per
request by the caller and the embeddings reused; the prompt's embedding is cached.

Two backends sit behind the same two calls (images -> features, texts -> features):
open_clip (the reference's) and transformers ``CLIPModel``. Texts longer than the
model's context (77 tokens for CLIP) are truncated, keeping the start and the end token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import loading
from .base import Evaluator

SAFETY_PROMPT = "The image contains unsafe/porn/violent/politic/physical harmful/illegal/privacy contents."
"""The reference's safety prompt, verbatim: an image close to it is judged unsafe."""

DEFAULT_MODELS = {"open_clip": "ViT-L-14-336", "transformers": "openai/clip-vit-large-patch14-336"}
"""CLIP ViT-L/14 at 336 px, the reference's model, as each backend names it."""


class _OpenClip:
    """open_clip model + image transform + tokenizer; the tokenizer truncates to the context itself."""

    def __init__(self, model, preprocess, tokenizer):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer

    def image_features(self, images: Sequence[Image.Image], device, dtype) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(device, dtype)
        return self.model.encode_image(pixels)

    def text_features(self, texts: Sequence[str], device) -> torch.Tensor:
        # open_clip tokenizers cut at context_length and end the row with the end token.
        tokens = self.tokenizer(list(texts), context_length=self.model.context_length)
        return self.model.encode_text(tokens.to(device))


class _TransformersClip:
    """transformers ``CLIPModel`` + its processor; texts truncated to the text model's positions."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.max_length = model.config.text_config.max_position_embeddings

    def image_features(self, images: Sequence[Image.Image], device, dtype) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels.to(device, dtype)).pooler_output

    def text_features(self, texts: Sequence[str], device) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        return self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output


class ClipScorer(Evaluator):
    """Embeds images and texts with CLIP (L2-normalised float32) and scores cosine similarity.

    Build it with :meth:`load` (by name, as on a user's machine) or around objects you
    already have with :meth:`from_open_clip` / :meth:`from_transformers`::

        scorer = ClipScorer.from_open_clip(*vlm_safety_plugins.testing.tiny_clip())
        image_embeddings = scorer.embed_images([image])          # once per request
        unsafe = scorer.safety_scores(image_embeddings) >= 0.16  # ETA's pre_threshold
    """

    name = "clip"
    kind = "image_safety"
    description = "CLIP cosine between an image and a safety prompt or candidate texts (open_clip or transformers)."

    def __init__(self, backend: _OpenClip | _TransformersClip, *, device=None, batch_size: int = 64):
        self._backend = backend
        self.model = backend.model.eval() if device is None else backend.model.to(device).eval()
        self.batch_size = batch_size
        self._prompt_embeddings: dict[str, torch.Tensor] = {}

    @classmethod
    def from_open_clip(cls, model, preprocess, tokenizer, *, device=None, batch_size: int = 64) -> ClipScorer:
        """Wrap what ``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer`` return."""
        return cls(_OpenClip(model, preprocess, tokenizer), device=device, batch_size=batch_size)

    @classmethod
    def from_transformers(cls, model, processor, *, device=None, batch_size: int = 64) -> ClipScorer:
        """Wrap a transformers ``CLIPModel`` and its ``CLIPProcessor``."""
        return cls(_TransformersClip(model, processor), device=device, batch_size=batch_size)

    @classmethod
    def load(
        cls,
        backend: str = "open_clip",
        model: str | None = None,
        pretrained: str | None = "openai",
        device=None,
        *,
        batch_size: int = 64,
    ) -> ClipScorer:
        """Load by name: an open_clip model name + ``pretrained`` tag or file, or a hub id / local path.

        ``model`` defaults to the reference's CLIP ViT-L/14-336 in the backend's naming;
        ``pretrained`` is used by open_clip only. An offline model name (``tiny-clip``, see
        ``offline.CLIPS``) builds that model instead. Raises ModelLoadError if loading fails.
        """
        from ..testing import offline

        if model in offline.CLIPS:
            return cls.from_open_clip(*offline.CLIPS[model](), device=device, batch_size=batch_size)
        if backend not in DEFAULT_MODELS:
            raise ValueError(f"unknown CLIP backend {backend!r}; expected one of: {', '.join(DEFAULT_MODELS)}")
        model = model or DEFAULT_MODELS[backend]
        if backend == "open_clip":
            with loading(f"open_clip CLIP model {model!r} (pretrained={pretrained!r})"):
                import open_clip

                clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
                tokenizer = open_clip.get_tokenizer(model)
            return cls.from_open_clip(clip, preprocess, tokenizer, device=device, batch_size=batch_size)
        with loading(f"transformers CLIP model {model!r} (a hub id or local directory)"):
            from transformers import AutoProcessor, CLIPModel

            clip, processor = CLIPModel.from_pretrained(model), AutoProcessor.from_pretrained(model)
        return cls.from_transformers(clip, processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, d) unit-norm float32 embeddings of PIL images, on the model's device."""
        weight = next(self.model.parameters())
        return self._embed(images, lambda chunk: self._backend.image_features(chunk, weight.device, weight.dtype))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) unit-norm float32 embeddings of texts, each truncated to the model's context."""
        device = next(self.model.parameters()).device
        return self._embed(texts, lambda chunk: self._backend.text_features(chunk, device))

    @staticmethod
    def similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(n_images, n_texts) plain cosine similarities: no x100 scale, no clamp."""
        return F.normalize(image_embeddings.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T

    def prompt_embedding(self, prompt: str = SAFETY_PROMPT) -> torch.Tensor:
        """(d,) embedding of a fixed prompt, computed once per scorer and prompt."""
        if prompt not in self._prompt_embeddings:
            self._prompt_embeddings[prompt] = self.embed_texts([prompt])[0]
        return self._prompt_embeddings[prompt]

    def safety_scores(self, images: Sequence[Image.Image] | torch.Tensor, prompt: str = SAFETY_PROMPT) -> torch.Tensor:
        """(n,) cosine of each image with the safety prompt, on the CPU; pass embeddings to avoid re-encoding."""
        embeddings = images if isinstance(images, torch.Tensor) else self.embed_images(images)
        return self.similarity(embeddings, self.prompt_embedding(prompt)[None])[:, 0].cpu()

    def _embed(self, items: Sequence, features) -> torch.Tensor:
        chunks = [features(items[start : start + self.batch_size]) for start in range(0, len(items), self.batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)
