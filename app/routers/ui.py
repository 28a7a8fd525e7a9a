"""The web UI at ``/`` (static ES modules from app/static/ui, no build step) and ``GET /v1/info``.

The UI is plain files: index.html, a few JavaScript modules and one stylesheet, served with a
Content-Security-Policy that allows only this origin's scripts (no inline script, no eval, no CDN), so a
label that smuggles markup can at worst show up as text. ``/v1/info`` tells the create form what it may
choose (methods, the operator's backbones, TuneConfig defaults, upload limits).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field

from rmt_core import __version__
from rmt_core import config as tune_config
from rmt_core.config import METHODS, TuneConfig
from rmt_service.store import StoreError

from ..deps import SettingsDep, StoreDep, TenantDep
from ..errors import ApiError
from ..schemas import ErrorBody
from ..serving import owned_classifier

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
UI_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
              "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
_IMAGE_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp",
                "TIFF": "image/tiff"}
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Only the files that ship, looked up by name: a request path is never joined onto the directory.
_ASSETS = {p.name: p for p in UI_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA} if UI_DIR.is_dir() else {}
# The TuneConfig fields the create form offers; the rest stay reachable through its "extra settings" JSON.
_FORM_FIELDS = ("method", "epochs", "min_steps", "learning_rate", "batch_size", "holdout", "seed",
                "prompt_template", "leak", "threshold", "select", "unknown")

router = APIRouter(tags=["ui"])


def _ui_file(name: str) -> FileResponse:
    path = _ASSETS.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no UI file {name!r}")
    return FileResponse(path, media_type=_MEDIA[path.suffix], headers=UI_HEADERS)


@router.get("/", include_in_schema=False)
def ui_index() -> FileResponse:
    """The web UI's single page."""
    return _ui_file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
def ui_asset(name: str) -> FileResponse:
    """A script, stylesheet or icon of the web UI."""
    return _ui_file(name)


class UploadLimits(BaseModel):
    max_files: int
    max_image_bytes: int
    max_upload_bytes: int
    max_classes: int
    max_label_length: int


class ServiceInfo(BaseModel):
    version: str
    auth_required: bool = Field(description="True when requests need 'Authorization: Bearer <API key>'.")
    methods: list[str] = Field(description="Tuning methods a create may ask for (config.method).")
    candidates: list[str] = Field(description="Models a create may pin with config.select (besides 'auto').")
    backbones: list[str] = Field(description="Backbones a create may ask for (config.backbone); the first is the default.")
    default_backbone: str
    pretrained: list[str | None] = Field(description="Weights a create may ask for (config.pretrained; null = random "
                                                     "init); sending none uses the operator's default.")
    defaults: dict[str, Any] = Field(description="TuneConfig defaults of the settings the web UI offers.")
    limits: UploadLimits


def allowed_backbones(settings) -> list[str]:
    """The operator's allow-list, default first."""
    if hasattr(settings, "backbone_allow_list"):
        return settings.backbone_allow_list()
    return [settings.default_backbone]


def allowed_pretrained(settings) -> list[str | None]:
    """The ``pretrained`` values a request may name (None = random init), without checkpoint paths: a tenant
    gets the operator's default checkpoint by sending nothing, and never learns where it lives."""
    values = settings.pretrained_allow_list() if hasattr(settings, "pretrained_allow_list") else []
    return [v for v in values if v is None or not ("/" in v or "\\" in v)]


@router.get("/v1/info", response_model=ServiceInfo, responses={401: {"model": ErrorBody}})
def read_info(request: Request, settings: SettingsDep, _tenant: TenantDep) -> ServiceInfo:
    """What a create may choose (methods, backbones, defaults) and the upload limits."""
    defaults = dataclasses.asdict(TuneConfig())
    return ServiceInfo(
        version=__version__, auth_required=bool(request.app.state.tenant_keys), methods=list(METHODS),
        candidates=list(getattr(tune_config, "CANDIDATES", ())),
        backbones=allowed_backbones(settings), default_backbone=settings.default_backbone,
        pretrained=allowed_pretrained(settings),
        defaults={k: defaults[k] for k in _FORM_FIELDS if k in defaults},
        limits=UploadLimits(max_files=settings.max_files, max_image_bytes=settings.max_image_bytes,
                            max_upload_bytes=settings.max_upload_bytes, max_classes=settings.max_classes,
                            max_label_length=settings.max_label_length))


def _image_type(path: Path) -> str:
    try:
        with Image.open(path) as img:  # reads the header only
            return _IMAGE_TYPES.get(img.format or "", "application/octet-stream")
    except Exception:  # decoded at upload, so this is a damaged blob: let the browser refuse it
        return "application/octet-stream"


@router.get("/v1/classifiers/{classifier_id}/samples/{index}", response_class=FileResponse, tags=["classifiers"],
            responses={code: {"model": ErrorBody} for code in (401, 404)})
async def read_sample(classifier_id: str, index: int, store: StoreDep, tenant: TenantDep) -> FileResponse:
    """One uploaded image by its position in the upload (``validation.misclassified[].index`` names them)."""
    owned_classifier(store, classifier_id, tenant)
    try:
        samples = await run_in_threadpool(store.samples, classifier_id)
    except StoreError:  # deleted meanwhile
        raise ApiError(404, "not_found", f"no classifier {classifier_id!r}") from None
    if not 0 <= index < len(samples):
        raise ApiError(404, "not_found", f"classifier {classifier_id} has images 0-{len(samples) - 1}, not {index}")
    path = samples[index][0]
    media = await run_in_threadpool(_image_type, path)
    # an upload is the tenant's own data, but never let a browser treat it as a page
    return FileResponse(path, media_type=media, headers={"Content-Security-Policy": "default-src 'none'; sandbox",
                                                         "X-Content-Type-Options": "nosniff",
                                                         "Cache-Control": "private, max-age=3600"})
