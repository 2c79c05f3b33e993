"""Images of a request: ``data:`` URIs, or http(s) URLs when the operator allows them.

A request never makes the server read a path: ``file:`` and every other scheme are
refused. Sizes are checked before pixels are decoded: the encoded bytes against
``max_bytes`` and the header's width × height against ``max_pixels`` (413 either way), so
a decompression bomb is refused from its header.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .protocol import APIError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 6000 * 6000
    max_images: int = 8
    allow_urls: bool = False


def load_image(url: str, limits: ImageLimits, param: str) -> tuple[Image.Image, str]:
    """The RGB image an ``image_url`` names, and the image's own bytes as a ``data:`` URI (what a
    gateway forwards, never re-encoded); APIError (400 or 413) naming ``param`` otherwise."""
    if url.startswith("data:"):
        data = _decode_data_uri(url, limits, param)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_urls:
            raise APIError(
                400,
                f"{param}: remote image URLs are off on this server; send the image as a data: URI "
                "(the operator can allow URLs with --allow-image-urls)",
                param=param,
                code="image_url_not_allowed",
            )
        data = _fetch(url, limits, param)
    else:
        raise APIError(400, f"{param}: an image must be a data: URI or an http(s) URL", param=param, code="bad_image")
    image, kind = _decode(data, limits, param)
    return image, url if url.startswith("data:") else f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _decode_data_uri(url: str, limits: ImageLimits, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise APIError(400, f"{param}: expected data:image/...;base64,<data>", param=param, code="bad_image")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _too_large(param, f"more than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data: URI is not valid base64", param=param, code="bad_image") from None


def _fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vlm-safety-plugins"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise APIError(400, f"{param}: could not fetch the image: {error}", param=param, code="bad_image") from None
    if len(data) > limits.max_bytes:
        raise _too_large(param, f"more than {limits.max_bytes} bytes")
    return data


def _decode(data: bytes, limits: ImageLimits, param: str) -> tuple[Image.Image, str]:
    """The RGB image and its format's name (``png``, ``jpeg``, ...)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise _too_large(param, f"{width}×{height} pixels, more than {limits.max_pixels}")
            return image.convert("RGB"), image.format.lower()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as error:
        reason = "not a PNG, JPEG, WEBP, GIF or BMP image" if isinstance(error, UnidentifiedImageError) else error
        raise APIError(400, f"{param}: cannot read the image: {reason}", param=param, code="bad_image") from None


def _too_large(param: str, what: str) -> APIError:
    return APIError(413, f"{param}: the image is too large ({what})", param=param, code="image_too_large")
