"""A generated, captioned image world: the data the project's own small CLIP is pretrained on.

Real CLIP weights cannot be fetched on every machine, so the project pretrains a tiny CLIP on a
world it can generate anywhere, deterministically from a seed: one shape per image, described by
``shape × colour × size × texture × background × position``, with captions such as
"a photo of a small red striped circle". The world also has knobs that the pretraining data never
exercises (``Style``: noise, colour casts, blur, an outline/sketch rendering; and textures that are
never seen in pretraining), which downstream benchmarks use to build domain-shifted tasks where
zero-shot CLIP is weak and tuning has something to fix.

PIL + numpy only (no torch), so tests and dataset writers stay light.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (35, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 120, 190),
    "brown": (130, 80, 35),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.33}  # circumradius as a fraction of the image side
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
# Rendered by the same code but never drawn in pretraining: material for domain-shifted tasks.
UNSEEN_TEXTURES: tuple[str, ...] = ("wavy", "speckled", "ringed", "gradient")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
}
# Centre offsets as fractions of the image side; large shapes move half as far so they stay inside.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0),
    "left": (-0.25, 0.0),
    "right": (0.25, 0.0),
    "top": (0.0, -0.25),
    "bottom": (0.0, 0.25),
}
_POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a rendering of a {}.")
_SUPERSAMPLE = 3


@dataclass(frozen=True)
class Attributes:
    """What one image shows; every field is a word that can appear in a caption."""

    shape: str
    colour: str
    size: str = "large"
    texture: str = "solid"
    background: str = "white"
    position: str = "center"

    def __post_init__(self) -> None:
        for name, allowed in _ATTRIBUTE_VALUES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not part of the world; choose one of {sorted(allowed)}")


_ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "texture": TEXTURES + UNSEEN_TEXTURES,
    "background": tuple(BACKGROUNDS),
    "position": tuple(POSITIONS),
}


@dataclass(frozen=True)
class WorldSpec:
    """Which attribute values a sampler draws from (uniformly). The default is the pretraining world."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    textures: tuple[str, ...] = TEXTURES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    positions: tuple[str, ...] = tuple(POSITIONS)

    def __post_init__(self) -> None:
        for f in fields(self):
            values = getattr(self, f.name)
            attribute = _SPEC_TO_ATTRIBUTE[f.name]
            if not values:
                raise ValueError(f"WorldSpec.{f.name} is empty; give at least one value")
            unknown = [v for v in values if v not in _ATTRIBUTE_VALUES[attribute]]
            if unknown:
                raise ValueError(
                    f"WorldSpec.{f.name} has unknown values {unknown}; "
                    f"choose from {list(_ATTRIBUTE_VALUES[attribute])}"
                )

    def sample(self, rng: np.random.Generator, **fixed: str) -> Attributes:
        """Draw one ``Attributes``; keyword arguments pin attributes (e.g. ``shape="circle"``)."""
        drawn = {}
        for spec_name, attribute in _SPEC_TO_ATTRIBUTE.items():
            choices = getattr(self, spec_name)
            drawn[attribute] = choices[int(rng.integers(len(choices)))]
        drawn.update(fixed)
        return Attributes(**drawn)


_SPEC_TO_ATTRIBUTE = {
    "shapes": "shape",
    "colours": "colour",
    "sizes": "size",
    "textures": "texture",
    "backgrounds": "background",
    "positions": "position",
}
PRETRAIN = WorldSpec()


@dataclass(frozen=True)
class Style:
    """How an image is rendered beyond its attributes. The defaults are the pretraining distribution.

    noise:       std of additive Gaussian pixel noise, in [0, 1] intensity units.
    colour_cast: per-channel gains (r, g, b) applied to the whole image, e.g. (1.0, 0.85, 0.55) = sepia-ish.
    blur:        Gaussian blur radius in output pixels.
    outline:     draw only the shape's outline (a sketch style); the interior shows the background.
    """

    noise: float = 0.0
    colour_cast: tuple[float, float, float] | None = None
    blur: float = 0.0
    outline: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"Style.noise={self.noise} must be in [0, 1]")
        if self.blur < 0:
            raise ValueError(f"Style.blur={self.blur} must be >= 0")
        if self.colour_cast is not None and (len(self.colour_cast) != 3 or min(self.colour_cast) < 0):
            raise ValueError(f"Style.colour_cast={self.colour_cast} must be three non-negative gains (r, g, b)")


PRETRAIN_STYLE = Style()


# ----------------------------------------------------------------------------------------- captions
def describe(attrs: Attributes) -> str:
    """The noun phrase naming every visual attribute, e.g. "small red striped circle"."""
    return f"{attrs.size} {attrs.colour} {attrs.texture} {attrs.shape}"


def caption(attrs: Attributes) -> str:
    """The canonical full caption, e.g. "a photo of a small red striped circle"."""
    return f"a photo of a {describe(attrs)}"


def random_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption mentioning a random subset of the attributes, in a random template.

    Pretraining on partial descriptions is what makes prompts such as "a photo of a circle." or
    "a photo of a red shape." meaningful at zero-shot time. Unmentioned shapes become "shape".
    """
    # The shape is named most often: it is the hardest attribute to see, and contrastive learning
    # otherwise settles on the easy ones (colour, size) and never learns shapes.
    words = []
    if rng.random() < 0.4:
        words.append(attrs.size)
    if rng.random() < 0.5:
        words.append(attrs.colour)
    if rng.random() < 0.4:
        words.append(attrs.texture)
    words.append(attrs.shape if rng.random() < 0.9 or not words else "shape")
    phrase = " ".join(words)
    if rng.random() < 0.25:
        phrase += f" on a {attrs.background} background"
    if rng.random() < 0.25:
        phrase += " " + _POSITION_PHRASES[attrs.position]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    if phrase[0] in "aeiou" and "a {}" in template:
        template = template.replace("a {}", "an {}")
    return template.format(phrase)


def caption_attributes(text: str) -> dict[str, str]:
    """The attributes a caption states: "a photo of a red shape on the left." -> {"colour": "red", "position": "left"}.

    Words that are not attribute values ("photo", "shape", "background") state nothing.
    """
    stated = {}
    for word in text.rstrip(".").split():
        for attribute, values in _ATTRIBUTE_VALUES.items():
            if word in values:
                stated[attribute] = word
    return stated


def matches(attrs: Attributes, stated: dict[str, str]) -> bool:
    """Whether an image with ``attrs`` fits a caption stating ``stated`` (see ``caption_attributes``)."""
    return all(getattr(attrs, k) == v for k, v in stated.items())


# ---------------------------------------------------------------------------------------- rendering
def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float, sx: float = 1.0) -> list[tuple]:
    return [
        (cx + sx * r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _rotate(points: list[tuple], cx: float, cy: float, angle: float) -> list[tuple]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _shape_mask(shape: str, side: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """An L-mode mask (255 inside) of ``shape`` with circumradius ``r`` centred at (cx, cy)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        rr = 0.9 * r
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
    elif shape == "crescent":
        rr = 0.95 * r
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        ox, oy = cx + 0.5 * rr * math.cos(angle), cy + 0.5 * rr * math.sin(angle)
        ri = 0.85 * rr
        draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, r, 4, math.pi / 4 + angle), fill=255)
    elif shape == "diamond":
        draw.polygon(_rotate(_regular_polygon(cx, cy, r, 4, 0.0, sx=0.6), cx, cy, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3, angle), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, math.pi / 6 + angle), fill=255)
    elif shape == "star":
        outer = _regular_polygon(cx, cy, 1.1 * r, 5, angle)
        inner = _regular_polygon(cx, cy, 0.45 * r, 5, angle + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "cross":
        a, w = r, 0.33 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        draw.polygon(_rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle), fill=255)
    else:  # Attributes validation makes this unreachable
        raise ValueError(f"unknown shape {shape!r}")
    return mask


@functools.lru_cache(maxsize=4)
def _grid(side: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / np.float32(px)
    return yy, xx


def _texture_field(texture: str, side: int, px: float, cx: float, cy: float, r: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Per-pixel blend weight in [0, 1] towards the texture's second colour (0 everywhere = solid).

    ``px`` is the size of one output pixel in supersampled pixels, so patterns keep their scale
    in output pixels whatever the output size.
    """
    if texture == "solid":
        return np.zeros((side, side), np.float32)
    yy, xx = _grid(side, px)
    theta = float(rng.choice([0.0, 0.5, 0.25, 0.75])) * math.pi
    along = xx * math.cos(theta) + yy * math.sin(theta)
    if texture == "striped":
        period = rng.uniform(5.0, 8.0)
        return ((along / period) % 1.0 < 0.5).astype(np.float32)
    if texture == "dotted":
        period = rng.uniform(5.0, 7.5)
        dx = (xx / period) % 1.0 - 0.5
        dy = (yy / period) % 1.0 - 0.5
        return (dx * dx + dy * dy < 0.3**2).astype(np.float32)
    if texture == "checkered":
        period = rng.uniform(4.0, 7.0)
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    if texture == "wavy":
        period, wavelength = rng.uniform(5.0, 8.0), rng.uniform(8.0, 14.0)
        across = -xx * math.sin(theta) + yy * math.cos(theta)
        return (((across + 2.0 * np.sin(along * 2 * math.pi / wavelength)) / period) % 1.0 < 0.5).astype(np.float32)
    if texture == "speckled":
        cells = max(1, int(math.ceil(side / (1.5 * px))))
        grain = (rng.random((cells, cells)) < 0.35).astype(np.float32)
        return np.kron(grain, np.ones((int(math.ceil(side / cells)),) * 2, np.float32))[:side, :side]
    if texture == "ringed":
        period = rng.uniform(4.0, 6.0)
        dist = np.hypot(xx - cx / px, yy - cy / px)
        return ((dist / period) % 1.0 < 0.5).astype(np.float32)
    if texture == "gradient":
        centre = (cx * math.cos(theta) + cy * math.sin(theta)) / px
        return np.clip((along - centre) / (2 * r / px) + 0.5, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) / 255.0 + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(np.float32)


def render(attrs: Attributes, size: int = 64, rng: np.random.Generator | None = None,
           style: Style = PRETRAIN_STYLE) -> Image.Image:
    """Render ``attrs`` as an RGB image of ``size``×``size``; ``rng`` draws the nuisance jitter.

    Jitter (exact hue, position, radius, rotation, pattern phase and period) comes only from
    ``rng``, so the same attributes and seed give the same pixels.
    """
    if size < 16:
        raise ValueError(f"size={size} is too small to draw shapes; use at least 16")
    rng = rng if rng is not None else np.random.default_rng()
    side = size * _SUPERSAMPLE
    colour = _jitter(COLOURS[attrs.colour], rng, 0.06)
    background = _jitter(BACKGROUNDS[attrs.background], rng, 0.04)
    dark_background = background.mean() < 0.35
    second = (0.35 * colour + 0.65 if dark_background else 0.4 * colour).astype(np.float32)  # light tint on dark, dark shade on light
    r = SIZES[attrs.size] * side * rng.uniform(0.9, 1.1)
    ox, oy = POSITIONS[attrs.position]
    reach = 0.5 if attrs.size == "large" else 1.0
    cx = side * (0.5 + reach * ox) + rng.uniform(-0.04, 0.04) * side
    cy = side * (0.5 + reach * oy) + rng.uniform(-0.04, 0.04) * side
    angle = rng.uniform(-0.2, 0.2)

    mask_img = _shape_mask(attrs.shape, side, cx, cy, r, angle)
    if style.outline:
        width = 2 * _SUPERSAMPLE + 1  # about two output pixels
        inner = np.asarray(mask_img.filter(ImageFilter.MinFilter(width)), np.int16)
        mask_img = Image.fromarray((np.asarray(mask_img, np.int16) - inner).clip(0, 255).astype(np.uint8))
    mask = np.asarray(mask_img, np.float32)[..., None] * np.float32(1 / 255)
    blend = _texture_field(attrs.texture, side, _SUPERSAMPLE, cx, cy, r, rng)
    if style.outline or attrs.texture == "solid":  # a sketch is drawn in one colour
        fill = colour
    else:
        fill = colour + blend[..., None] * (second - colour)
    canvas = background + mask * (fill - background)
    image = Image.fromarray((canvas * 255.0 + 0.5).astype(np.uint8), "RGB").resize((size, size), Image.BOX)

    if style.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    pixels = np.asarray(image, np.float32) / 255.0
    pixels = pixels + rng.normal(0.0, 0.01, pixels.shape)  # sensor-like grain, part of the pretraining world
    if style.colour_cast is not None:
        pixels = pixels * np.asarray(style.colour_cast, np.float32)
    if style.noise > 0:
        pixels = pixels + rng.normal(0.0, style.noise, pixels.shape)
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------- sampling
def item_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for item ``index`` of a stream seeded with ``seed``: items can be made in any order."""
    return np.random.default_rng([seed, index])


def sample_captioned(n: int, seed: int, size: int = 64, spec: WorldSpec = PRETRAIN,
                     style: Style = PRETRAIN_STYLE) -> list[tuple[Image.Image, str, Attributes]]:
    """``n`` (image, canonical caption, attributes) triples, deterministic in ``seed``."""
    out = []
    for i in range(n):
        rng = item_rng(seed, i)
        attrs = spec.sample(rng)
        out.append((render(attrs, size, rng, style), caption(attrs), attrs))
    return out


def parse_class(name: str) -> dict[str, str]:
    """Map a class phrase to the attributes it pins: "red circle" -> {"colour": "red", "shape": "circle"}.

    Each word must be a value of exactly one attribute, and no attribute may be named twice.
    """
    pinned: dict[str, str] = {}
    for word in name.split():
        owners = [a for a, values in _ATTRIBUTE_VALUES.items() if word in values]
        if not owners:
            raise ValueError(f"class {name!r}: {word!r} is not an attribute value of the world")
        attribute = owners[0]
        if attribute in pinned:
            raise ValueError(f"class {name!r} names the {attribute} twice ({pinned[attribute]!r}, {word!r})")
        pinned[attribute] = word
    if not pinned:
        raise ValueError("class name is empty")
    return pinned


def sample_class(name: str, n: int, seed: int, size: int = 64, spec: WorldSpec = PRETRAIN,
                 style: Style = PRETRAIN_STYLE) -> list[tuple[Image.Image, Attributes]]:
    """``n`` images of class ``name`` (see ``parse_class``); unpinned attributes are drawn from ``spec``."""
    pinned = parse_class(name)
    stream = int.from_bytes(name.encode(), "little") % (2**31)  # distinct streams per class, stable across runs
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])
        attrs = spec.sample(rng, **pinned)
        out.append((render(attrs, size, rng, style), attrs))
    return out


def write_class_folders(root: str | Path, classes: Sequence[str], n_per_class: int, seed: int, size: int = 64,
                        spec: WorldSpec = PRETRAIN, style: Style = PRETRAIN_STYLE) -> dict[str, list[Path]]:
    """Write a labelled dataset as ``root/<class>/<index>.png`` (ImageFolder layout) and return the paths.

    A class is an attribute phrase such as "circle" or "red circle"; its folder name is the phrase.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class={n_per_class} must be at least 1")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes contain duplicates: {list(classes)}")
    root = Path(root)
    written: dict[str, list[Path]] = {}
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i, (image, _) in enumerate(sample_class(name, n_per_class, seed, size, spec, style)):
            path = folder / f"{i:04d}.png"
            image.save(path)
            written[name].append(path)
    return written


# The demo task (`rmt sample`, `make demo`): five shapes under heavy sensor noise and a sepia cast, a domain the
# pretraining never showed, so zero-shot is weak (about 50%) and tuning has work to do. (The outline/sketch
# style is harder still: zero-shot is at chance there, and mask tuning collapses instead of learning; see
# bench/RESULTS.md.)
DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
DEMO_SHIFT = Style(noise=0.25, colour_cast=(1.0, 0.8, 0.5))


__all__ = [
    "SHAPES", "COLOURS", "SIZES", "TEXTURES", "UNSEEN_TEXTURES", "BACKGROUNDS", "POSITIONS",
    "Attributes", "WorldSpec", "PRETRAIN", "Style", "PRETRAIN_STYLE",
    "describe", "caption", "random_caption", "caption_attributes", "matches", "render", "item_rng", "sample_captioned",
    "parse_class", "sample_class", "write_class_folders", "DEMO_CLASSES", "DEMO_SHIFT",
]
