"""Prompt templates: CoOp's one-per-dataset templates, as used by the R-AMT paper (no torch)."""
from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."

COOP_TEMPLATES: dict[str, str] = {
    "ImageNet": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "StanfordCars": "a photo of a {}.",
    "SUN397": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
}


def class_prompt(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text for one class: '_' in folder-style class names becomes a space."""
    return template.format(label.replace("_", " ").strip())
