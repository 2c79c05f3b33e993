"""ModelAdapter: the generic adapter, built on the processor's chat template.

It answers, for any transformers VLM whose processor has a chat template: where the
decoder layers are (also through a PEFT wrapper), how to build the inputs of a request
with its real image, a corrupted image or no image, where the user turn ends and the
assistant turn starts, which positions hold image tokens, and how to rebuild raw images
from ``pixel_values``. Family adapters override only what differs.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import AdapterError, DefenseError

IMAGE_MODES = ("real", "blank", "noise", "none")
_PROBE_TEXT = "Is it safe."
_ENCODING_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENCODING_LOCKS_GUARD = threading.Lock()


def encoding_lock(tokenizer) -> threading.Lock:
    """The lock every encoding with ``tokenizer`` holds, one per tokenizer object.

    A fast tokenizer sets padding and truncation on its one shared Rust tokenizer at each
    call (on for a padded batch, off again for a lone text), so two threads encoding at
    once get each other's settings: a batch comes back unpadded and cannot be stacked.
    Decoding touches no such setting and takes no lock.
    """
    with _ENCODING_LOCKS_GUARD:
        return _ENCODING_LOCKS.setdefault(tokenizer, threading.Lock())


class ModelAdapter:
    """Generic adapter; subclasses set ``model_types`` and override what their family needs."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    thread_safe: ClassVar[bool] = False
    """Whether concurrent generate calls on one model are proven safe for this family (the
    conformance suite's concurrency check); servers serialise calls on models that are not."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._encoding = encoding_lock(self.tokenizer)

    # -- structure -----------------------------------------------------------------------

    @property
    def base_model(self):
        """The transformers model, with any PEFT wrapper taken off."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The language model's decoder layers, in order."""
        base = self.base_model
        try:
            layers = base.get_decoder().layers
        except AttributeError:
            raise AdapterError(
                f"{type(base).__name__}: cannot find decoder layers at "
                "model.get_decoder().layers; register a model adapter for this family"
            ) from None
        return list(layers)

    def hidden_size(self) -> int:
        return self.base_model.config.get_text_config().hidden_size

    def image_token_id(self) -> int:
        config = self.base_model.config
        for key in ("image_token_id", "image_token_index"):
            if getattr(config, key, None) is not None:
                return int(getattr(config, key))
        raise AdapterError(f"{type(self.base_model).__name__} config has no image_token_id")

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where ``input_ids`` holds an image (placeholder) token."""
        return input_ids == self.image_token_id()

    # -- building requests ----------------------------------------------------------------

    def messages(self, text: str, with_image: bool) -> list[dict]:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def prompt(self, text: str, with_image: bool) -> str:
        """The chat-formatted prompt of one user turn, ready for the assistant's answer."""
        return self.processor.apply_chat_template(
            self.messages(text, with_image), add_generation_prompt=True, tokenize=False
        )

    def build_inputs(
        self, requests: Sequence[tuple[str, Image.Image | None]], *, image_mode: str = "real", seed: int = 0
    ):
        """Model inputs for a batch of (text, image or None) requests, left-padded.

        ``image_mode``: ``real`` keeps each image; ``blank`` / ``noise`` swap it for a
        content-free image of the processor's size (the corrupted view steering calibrations use); ``none``
        drops images entirely (the text-only view). Rows without an image stay text-only.
        """
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {', '.join(IMAGE_MODES)}; got {image_mode!r}")
        generator = np.random.default_rng(seed)
        conversations = []
        for text, image in requests:
            keep = image is not None and image_mode != "none"
            if keep and image_mode != "real":
                image = self.corrupted_image(image_mode, generator, size=self.corruption_size(image))
            messages = self.messages(text, keep)
            if keep:
                next(part for part in messages[-1]["content"] if part["type"] == "image")["image"] = image
            conversations.append(messages)
        return self.conversation_inputs(conversations)

    def conversation_inputs(self, conversations: Sequence[list[dict]]):
        """Model inputs for a batch of whole conversations, left-padded, ready for the assistant's turn.

        Each conversation is a list of chat messages (``role``, ``content``: a string or a list of
        ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PIL image}`` parts), as
        servers receive them: system prompts and earlier turns included. Every text is checked
        for special tokens, whoever's turn it is (a forged turn marker in any of them is structure).
        """
        texts, images = [], []
        for row, messages in enumerate(conversations):
            self.check_conversation(messages, row)
            images.append(
                [
                    part["image"].convert("RGB")
                    for message in messages
                    if not isinstance(message["content"], str)
                    for part in message["content"]
                    if part["type"] == "image"
                ]
            )
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        try:
            return self.process(texts, images)
        except (ValueError, TypeError) as error:  # the processor's own checks (image size, aspect ratio, ...)
            raise AdapterError(f"the processor refused the request: {error}") from None

    def check_conversation(self, messages: Sequence[dict], row: int = 0) -> None:
        """``check_user_text`` on every text of a conversation, whoever's turn it is."""
        for message in messages:
            content = message["content"]
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    self.check_user_text(part["text"], row)

    def check_user_text(self, text: str, row: int = 0) -> None:
        """Refuse user text holding the model's special tokens (an image placeholder, a turn
        marker): they would be read as structure, not as words (an extra image slot, a forged turn)."""
        found = [token for token in self.special_tokens if token in text]
        if found:
            raise AdapterError(
                f"row {row}: the user text contains the model's special token {found[0]!r}; remove it "
                "(images are passed as images, not as placeholder text)"
            )

    def process(self, texts: list[str], images: list[list[Image.Image]]):
        """Run the processor on chat-formatted prompts and one list of images per row, left-padded."""
        bos = self.tokenizer.bos_token
        template_adds_bos = bool(bos) and all(text.startswith(bos) for text in texts)
        with self._encoding:
            return self.processor(
                text=texts,
                images=self.images_argument(images),
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=not template_adds_bos,
            )

    @functools.cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The strings the processor and tokenizer read as structure, never as user words."""
        special = {getattr(self.processor, name, None) for name in ("image_token", "video_token", "boi_token")}
        return tuple(sorted(token for token in special | set(self.tokenizer.all_special_tokens) if token))

    def images_argument(self, images: list[list[Image.Image]]):
        """The processor's ``images=`` for one list of images per row: flat, or None if there are none.

        Families whose processors want nested lists override this."""
        return [image for row in images for image in row] or None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images the processor produces."""
        image_processor = self.processor.image_processor
        for key in ("crop_size", "size"):
            size = getattr(image_processor, key, None)
            if size is None:
                continue
            size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
            if "height" in size and "width" in size:
                return int(size["width"]), int(size["height"])
            if "shortest_edge" in size:
                return int(size["shortest_edge"]), int(size["shortest_edge"])
        return 336, 336

    def corruption_size(self, image: Image.Image) -> tuple[int, int]:
        """Size of the corrupted stand-in for ``image``: the processor's input size."""
        return self.image_size()

    def corrupted_image(
        self, kind: str, generator: np.random.Generator | None = None, size: tuple[int, int] | None = None
    ) -> Image.Image:
        """A content-free image: ``blank`` (mid-grey) or ``noise`` (uniform random pixels)."""
        width, height = size or self.image_size()
        if kind == "blank":
            return Image.new("RGB", (width, height), (128, 128, 128))
        if kind == "noise":
            generator = generator or np.random.default_rng(0)
            return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        raise ValueError(f"corruption must be 'blank' or 'noise'; got {kind!r}")

    # -- turn structure -------------------------------------------------------------------

    @functools.cached_property
    def turn_suffix_ids(self) -> tuple[int, ...]:
        """Token ids that close the user turn and open the assistant turn (e.g. `` ASSISTANT:``)."""
        rendered = self.prompt(_PROBE_TEXT, with_image=False)
        end = rendered.rfind(_PROBE_TEXT)
        if end < 0:
            raise AdapterError("the chat template does not reproduce the user's text; cannot locate turns")
        return tuple(self._tokens_from(rendered, end + len(_PROBE_TEXT)))

    def response_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as the start of an assistant reply right after the turn opener.

        Read off the chat template rendering a reply, so leading-space conventions
        (SentencePiece ``▁``, byte-level ``Ġ``) come out as the model would generate them.
        """
        rendered = self.processor.apply_chat_template(
            self.messages(_PROBE_TEXT, with_image=False)
            + [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
            tokenize=False,
        )
        start = rendered.rfind(text)
        if start < 0 or rendered.rfind(_PROBE_TEXT) > start:
            return self.continuation_ids(text)
        encoded = self.encode(rendered, return_offsets_mapping=True)
        return [
            token
            for token, (begin, stop) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if begin < start + len(text) and stop > start
        ]

    def user_text(self, input_ids: torch.Tensor) -> str:
        """Best-effort text of the last user turn of one row's prompt (images and markup removed)."""
        end = int(self.user_turn_end(input_ids[None])[0])
        before = self.prompt(_PROBE_TEXT, with_image=False)
        opener = before[: before.rfind(_PROBE_TEXT)]
        for special in self.tokenizer.all_special_tokens:
            opener = opener.rsplit(special, 1)[-1]
        text = self.tokenizer.decode(input_ids[:end], skip_special_tokens=True)
        return text.rsplit(opener.strip(), 1)[-1].strip() if opener.strip() else text.strip()

    def encode(self, text: str, **options):
        """The tokenizer's encoding of ``text`` as written (no special tokens added), safe beside other threads'."""
        with self._encoding:
            return self.tokenizer(text, add_special_tokens=False, **options)

    def continuation_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as it tokenizes right after earlier text (no BOS, in-context spaces)."""
        return self._tokens_from(_PROBE_TEXT + text, len(_PROBE_TEXT))

    def _tokens_from(self, text: str, start: int) -> list[int]:
        encoded = self.encode(text, return_offsets_mapping=True)
        ids = [token for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if begin >= start]
        if not ids and start < len(text):
            raise AdapterError(f"cannot tokenize {text[start:]!r} apart from the text before it")
        return ids

    def user_turn_end(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, the index where the last user turn's text ends (the suffix begins)."""
        suffix = torch.tensor(self.turn_suffix_ids, device=input_ids.device, dtype=input_ids.dtype)
        length = suffix.numel()
        if input_ids.shape[1] >= length:
            matches = (input_ids.unfold(1, length, 1) == suffix).all(dim=-1)
        else:
            matches = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        found = matches.any(dim=1)
        if not bool(found.all()):
            row = int((~found).nonzero()[0])
            opener = self.tokenizer.decode(list(self.turn_suffix_ids))
            raise DefenseError(
                f"row {row}: the prompt has no assistant-turn opener {opener!r}; build inputs "
                "with processor.apply_chat_template(..., add_generation_prompt=True)"
            )
        last_from_end = matches.flip(1).float().argmax(dim=1)
        return matches.shape[1] - 1 - last_from_end

    def assistant_start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, the index of the first assistant token (right after the opener)."""
        return self.user_turn_end(input_ids) + len(self.turn_suffix_ids)

    # -- continuing from a cache ------------------------------------------------------------

    def continuation_inputs(self, prompt: dict, rows: Sequence[int], inputs: dict) -> dict:
        """Extra model inputs for continuing ``rows`` of a call whose prompt was ``prompt`` from a KV cache.

        ``inputs`` are the continuation's own (the grown ``input_ids`` and attention mask). Whatever the
        model would otherwise keep between passes is computed here, per call, so concurrent calls
        cannot clobber each other. Most models need nothing; Qwen2-VL needs its M-RoPE positions.
        """
        return {}

    # -- raw images -------------------------------------------------------------------------

    def rebuild_images(self, inputs: dict) -> list[list[Image.Image]]:
        """Raw images per row from normalised ``pixel_values`` (one image per image-token run)."""
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() != 4:
            raise DefenseError(
                f"{type(self.base_model).__name__}: this defense needs the raw images; "
                "pass images=[...] to generate (one per row)"
            )
        processor = self.processor.image_processor
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        scale = float(getattr(processor, "rescale_factor", 1 / 255))
        pictures = iter(pixels.float().cpu())
        images = []
        for count in self.image_runs(inputs["input_ids"]).tolist():
            row = []
            for _ in range(count):
                array = ((next(pictures) * std + mean) / scale).clamp(0, 255).round().byte()
                row.append(Image.fromarray(array.permute(1, 2, 0).numpy()))
            images.append(row)
        return images

    def image_runs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row, how many separate runs of image tokens (images) the prompt holds."""
        mask = self.image_token_mask(input_ids).int()
        starts = mask[:, 1:] > mask[:, :-1]
        return starts.sum(dim=1) + mask[:, 0]


def processor_adapter(source: str, *, trust_remote_code: bool = False) -> ModelAdapter:
    """The generic adapter over a model's processor alone (no weights), where only its text side is needed:
    its special tokens, an assistant turn's opening ids (an engine or a gateway in front of one)."""
    from transformers import AutoProcessor

    return ModelAdapter(None, AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code))


def find_adapter(model, processor) -> ModelAdapter:
    """The registered adapter whose ``model_types`` has this model's type, else the generic one."""
    from .. import plugins

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    for registered in plugins.registry().model_adapters.values():
        if model_type in registered.cls.model_types:
            return registered.cls(model, processor)
    return ModelAdapter(model, processor)
