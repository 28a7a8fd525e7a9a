"""Toy backbones and tasks shared by the core tests."""
import numpy as np
from PIL import Image

from rmt_core.backbones import load_backbone

TOY_BACKBONES = ["rmt-tiny-vit", "rmt-tiny-vit-wide"]
METHODS = ["amt", "r-amt", "mmt", "r-mmt", "pmt", "r-pmt"]


def tiny(name="rmt-tiny-vit", seed=0):
    return load_backbone(name, pretrained=None, seed=seed)


def colour_task(n_per_class=8, size=40, seed=0):
    """Three classes of noisy solid colours: separable by a linear probe, unknown to a random CLIP."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30)}
    samples = []
    for label, rgb in colours.items():
        for _ in range(n_per_class):
            arr = np.clip(np.asarray(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            samples.append((Image.fromarray(arr), label))
    return samples
