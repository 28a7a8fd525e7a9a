"""Decoding untrusted image bytes with limits (no torch)."""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What counts as an image file by its name: in a folder given to `rmt tune` / `rmt predict`, and in an uploaded
# zip (the API, the web page's app/static/ui/zip.js and rmt_client use the same list). Other files are left out.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

log = logging.getLogger(__name__)


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
        raise InvalidImage("too_many_pixels", f"{name} has more pixels than the limit of {max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # the decoder's own text stays in the log
        log.debug("%s does not decode: %r", name, exc)
        raise InvalidImage("corrupt", f"{name} is truncated or corrupt") from None
    img = _upright(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit (and 32-bit) grey: scale, do not clip at 255
        img = _to_8bit(img)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store portrait photos as rotated landscape pixels plus a tag)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels as stored are still an image
        log.debug("ignoring an unreadable EXIF orientation", exc_info=True)
        return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high bit-depth grey image as 8-bit 'L', scaled by its bit depth (Pillow's convert clips to 255, which
    turns nearly every pixel of a 16-bit image white)."""
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if values.max(initial=0.0) <= 1.0 else float(values.max())
        scaled = values / top * 255.0 if top > 0 else values
    else:
        values = values.astype(np.int64)
        high = int(values.max(initial=0))
        if img.mode.startswith("I;16"):
            depth = 65535
        else:  # 32-bit 'I' (16-bit TIFFs and PNGs can open as it): the smallest depth that holds the values
            depth = 255 if high <= 255 else 65535 if high <= 65535 else high
        scaled = np.clip(values, 0, None) * (255.0 / depth)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image_file(path, max_pixels: int = 40_000_000) -> Image.Image:
    with open(path, "rb") as fh:
        return open_image(fh.read(), max_pixels=max_pixels, name=str(path))
