"""Decoding untrusted image bytes with limits (no torch)."""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class InvalidImage(ValueError):
    """An upload that is not a usable image; ``code`` says why in one word."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def open_image(data: bytes, max_pixels: int = 40_000_000, name: str = "image") -> Image.Image:
    """Decode ``data`` fully into an RGB image, refusing empty, non-image, corrupt and oversized input.

    The pixel limit is checked from the header before any decoding, so a decompression bomb costs nothing.
    """
    if not data:
        raise InvalidImage("empty", f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImage("too_many_pixels",
                                   f"{name} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            img.load()
    except InvalidImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidImage("not_an_image", f"{name} is not an image Pillow can read") from None
        raise InvalidImage("too_many_pixels", f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage("corrupt", f"{name} is truncated or corrupt: {exc}") from None
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
    return img


def open_image_file(path, max_pixels: int = 40_000_000) -> Image.Image:
    with open(path, "rb") as fh:
        return open_image(fh.read(), max_pixels=max_pixels, name=str(path))
