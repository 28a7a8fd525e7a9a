"""open_clip's eval transform in PIL/numpy, so serving needs no torch.

Same PIL resize call as torchvision's Resize on a PIL image, the same center-crop arithmetic, then
ToTensor + Normalize: the output matches open_clip's ``preprocess`` to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessConfig:
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_dict(cls, cfg: dict) -> "PreprocessConfig":
        size = cfg["size"]
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        resize_mode = cfg.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode={resize_mode!r} is not supported (shortest, squash)")
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(_INTERPOLATION)}")
        return cls(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=interpolation, resize_mode=resize_mode)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


def _resize_shortest(img: Image.Image, short: int, resample) -> Image.Image:
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, crop_h: int, crop_w: int) -> Image.Image:
    width, height = img.size
    if crop_w > width or crop_h > height:  # torchvision pads with zeros before cropping
        padded = Image.new(img.mode, (max(width, crop_w), max(height, crop_h)))
        padded.paste(img, ((max(crop_w - width, 0)) // 2, (max(crop_h - height, 0)) // 2))
        img, (width, height) = padded, padded.size
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    if (left, top, crop_w, crop_h) == (0, 0, width, height):  # the whole image: no copy
        return img
    return img.crop((left, top, left + crop_w, top + crop_h))


@lru_cache(maxsize=64)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: what ToTensor + Normalize make of each 8-bit value in each channel, by the same float32
    operations as on a whole image (v / 255, - mean, / std: each correctly rounded), so bit-identical to them."""
    values = np.arange(256, dtype=np.float32)[None, :] / 255.0
    table = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False
    return table


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> float32 array [3, H, W], normalized as CLIP expects."""
    resample = _INTERPOLATION[cfg.interpolation]
    height, width = cfg.size
    if cfg.resize_mode == "squash":
        img = img.resize((width, height), resample)
    else:
        if height != width:
            raise ValueError("shortest-side resize needs a square input size")
        img = _center_crop(_resize_shortest(img, height, resample), height, width)
    # ToTensor + Normalize as one table lookup per channel, written straight into [3, H, W]: the float image,
    # its normalized copy and the transposed copy took 1.3-1.5 ms of a 224x224 request, this 0.5-0.8 ms
    # (bench/RESULTS-multitenant.md). mode="clip" only spares np.take a buffered copy: uint8 indices fit.
    pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    table = _normalize_table(tuple(cfg.mean), tuple(cfg.std))
    out = np.empty((3, *pixels.shape[:2]), np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[c], mode="clip")
    return out


def preprocess_batch(images, cfg: PreprocessConfig) -> np.ndarray:
    return np.stack([preprocess_image(img, cfg) for img in images]).astype(np.float32, copy=False)
