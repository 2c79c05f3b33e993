"""Sample: one benchmark request in the uniform form every loader yields; the evaluation errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..core.errors import VLMSafetyError

LABELS = ("harmful", "benign")


class EvaluationError(VLMSafetyError, ValueError):
    """An evaluation cannot go on (bad input files, an output folder of another run); the
    message names the file, and the line or row and the field where it can."""

    def __init__(self, message: str, *, source: str | Path | None = None, where: str | None = None):
        self.source, self.where, self.reason = (str(source) if source is not None else None), where, message
        prefix = ": ".join(part for part in (self.source, where) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class BenchmarkError(EvaluationError):
    """A benchmark is missing, unreadable or malformed."""


@dataclass
class Sample:
    """One request: ``image`` is a file path, a PIL image or None (text only); ``label`` is
    ``harmful`` or ``benign``; ``reference_answer`` (benign samples) is what a correct answer
    contains; ``meta`` keeps format-specific facts (written to the responses file)."""

    id: str
    prompt: str
    image: str | Path | Image.Image | None
    label: str
    category: str | None = None
    reference_answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise BenchmarkError(f"sample id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.prompt, str):
            raise BenchmarkError(
                f"prompt must be a string, got {type(self.prompt).__name__}", where=f"sample {self.id}"
            )
        if self.label not in LABELS:
            raise BenchmarkError(
                f"label must be one of {', '.join(LABELS)}, got {self.label!r}", where=f"sample {self.id}"
            )

    def load_image(self) -> Image.Image | None:
        """The sample's image as RGB, or None; an unreadable file is a BenchmarkError naming it."""
        if self.image is None:
            return None
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        try:
            with Image.open(self.image) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            reason = "image file not found"
        except UnidentifiedImageError:
            reason = "not an image PIL can read"
        except Image.DecompressionBombError as error:
            reason = f"refused: {error}"
        except OSError as error:
            reason = f"cannot read image: {error.strerror or error}"
        raise BenchmarkError(reason, source=self.image, where=f"sample {self.id}")

    def image_ref(self) -> str | None:
        """What the responses file records as the image: its path, ``<in-memory>`` or None."""
        if self.image is None:
            return None
        return "<in-memory>" if isinstance(self.image, Image.Image) else str(self.image)
