"""The OpenAPI document: FastAPI's, plus what it cannot see in hand-read multipart forms.

Create and classify read their multipart bodies by hand (request.form(), for upload limits), so FastAPI
knows their fields only from ``openapi_extra``. This module adds the typed ``TuneConfig`` schema that the
create form's ``config`` part refers to, generated from the dataclass so it never drifts from it.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, create_model

from rmt_core.config import (CANDIDATES, FLOAT_RANGES, INT_RANGES, MAX_NAME_LENGTH, MAX_TEMPLATE_LENGTH, METHODS,
                             PRECISIONS, QUICK_GELU, RECIPES, TuneConfig)

TUNE_CONFIG_REF = "#/components/schemas/TuneConfig"


def _bounds(name: str) -> dict[str, Any]:
    """The schema's bounds of one field: TuneConfig's own ranges, so the document and the check never differ."""
    if name in FLOAT_RANGES:
        low, high, low_open = FLOAT_RANGES[name]
        return {"gt" if low_open else "ge": low, "le": high}
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        return {"ge": low, "le": high}
    if name in ("backbone", "pretrained"):
        return {"min_length": 1, "max_length": MAX_NAME_LENGTH}
    if name == "prompt_template":
        return {"max_length": MAX_TEMPLATE_LENGTH, "pattern": r"^[^{}]*\{\}[^{}]*$"}
    return {}


_CHOICES: dict[str, Any] = {
    "method": Literal[METHODS],  # type: ignore[valid-type]
    "select": Literal[("auto", *CANDIDATES)],  # type: ignore[valid-type]
    "quick_gelu": Literal[tuple(QUICK_GELU)] | bool,  # type: ignore[valid-type]
    "recipe": Literal[tuple(RECIPES)],  # type: ignore[valid-type]
    "precision": Literal[PRECISIONS],  # type: ignore[valid-type]
}


def tune_config_model(defaults: dict[str, Any] | None = None) -> type[BaseModel]:
    """A pydantic model with TuneConfig's fields, types, bounds, defaults and help texts (``defaults``
    overrides)."""
    hints = typing.get_type_hints(TuneConfig)
    defaults = defaults or {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TuneConfig):
        hint = _CHOICES.get(f.name, hints[f.name])
        fields[f.name] = (hint, Field(defaults.get(f.name, f.default), description=f.metadata.get("help"),
                                      **_bounds(f.name)))
    return create_model("TuneConfig", __config__=ConfigDict(extra="forbid"), **fields)


def tune_config_schema(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = tune_config_model(defaults).model_json_schema()
    schema["description"] = ("Tuning settings, sent as the `config` form part holding a JSON object. Every field "
                             "is optional; unknown fields are rejected (422 invalid_config), and so is a mask_init "
                             "not above threshold, which a schema cannot say.")
    return schema


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that adds the TuneConfig component (defaults from the settings)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes, tags=app.openapi_tags, servers=app.servers)
            settings = app.state.settings
            defaults = {"backbone": settings.default_backbone, "pretrained": settings.default_pretrained}
            spec.setdefault("components", {}).setdefault("schemas", {})["TuneConfig"] = tune_config_schema(defaults)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
