"""Turning an untrusted multipart request into validated samples, or a clear 4xx that changes nothing.

Images are fully decoded with Pillow under pixel and byte limits before anything is stored; archive
member names are only ever read as "class/..." labels, never used as paths.
"""
from __future__ import annotations

import io
import json
import unicodedata
import zipfile
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from rmt_core.config import TuneConfig
from rmt_core.images import IMAGE_SUFFIXES, InvalidImage, open_image
from rmt_service.settings import Settings
from rmt_service.store import Sample

from .errors import ApiError, upload_interrupted

_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
_IMAGE_ERRORS = {"empty": (400, "empty_file"), "not_an_image": (415, "not_an_image"),
                 "corrupt": (415, "corrupt_image"), "too_many_pixels": (413, "too_many_pixels")}
MAX_NAME_LENGTH = 200
MAX_CONFIG_CHARS = 16_384


@dataclass
class CreateRequest:
    name: str
    config: dict[str, Any]
    samples: list[Sample]
    schedule: dict[str, Any] | None = None  # TuneConfig.schedule for this upload: what the 202 reports


def image_error(exc: InvalidImage, what: str) -> ApiError:
    status, code = _IMAGE_ERRORS.get(exc.code, (400, "invalid_image"))
    message = str(exc)  # open_image's own wording, which names the part already
    return ApiError(status, code, message if message.startswith(what) else f"{what}: {message}")


class PixelBudget:
    """Decoded pixels left for one request (per-image limits alone let 2,000 40-megapixel images through)."""

    def __init__(self, limit: int, setting: str):
        self.limit, self.left, self.setting = limit, limit, setting

    def spend(self, image: Image.Image, what: str) -> None:
        self.left -= image.width * image.height
        if self.left < 0:
            raise ApiError(413, "too_many_pixels", f"the images of this request decode to more than {self.limit} "
                                                   f"pixels together ({self.setting}); {what} went over")


def decode_image(data: bytes, settings: Settings, what: str, budget: PixelBudget | None = None) -> Image.Image:
    """Fully decoded RGB image, or the ApiError a client should see."""
    if len(data) > settings.max_image_bytes:
        raise ApiError(413, "image_too_large",
                       f"{what} is {len(data)} bytes; the limit is {settings.max_image_bytes} (RMT_MAX_IMAGE_BYTES)")
    max_pixels = settings.max_image_pixels if budget is None else min(settings.max_image_pixels, max(budget.left, 1))
    try:
        image = open_image(data, max_pixels=max_pixels, name=what)
    except InvalidImage as exc:
        if exc.code == "too_many_pixels" and budget is not None and max_pixels < settings.max_image_pixels:
            raise ApiError(413, "too_many_pixels", f"the images of this request decode to more than {budget.limit} "
                                                   f"pixels together ({budget.setting}); {what} went over") from None
        raise image_error(exc, what) from None
    if budget is not None:
        budget.spend(image, what)
    return image


def image_extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _EXT.get(img.format or "", ".img")
    except Exception:  # decode_image already accepted it; the extension is cosmetic
        return ".img"


def clean_label(raw: str, settings: Settings, where: str) -> str:
    """NFC-normalized, stripped label; refuses empty, too long, or control characters."""
    label = unicodedata.normalize("NFC", raw).strip()
    if not label:
        raise ApiError(400, "invalid_label", f"{where}: label is empty")
    if len(label) > settings.max_label_length:
        raise ApiError(400, "invalid_label", f"{where}: label is {len(label)} characters; the limit is "
                                             f"{settings.max_label_length} (RMT_MAX_LABEL_LENGTH)")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in label):
        raise ApiError(400, "invalid_label", f"{where}: label {label!r} contains control or unassigned characters")
    return label


async def read_form(request: Request, settings: Settings, max_files: int,
                    limit_name: str = "RMT_MAX_FILES", limit: int | None = None) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"expected multipart/form-data, got {content_type or 'no Content-Type'}")
    try:
        return await request.form(max_files=max_files, max_fields=max_files + 64, max_part_size=1024 * 1024)
    except ClientDisconnect:  # the body stopped arriving (client gone, or a server shutdown cut it): retryable
        raise upload_interrupted() from None
    except StarletteHTTPException as exc:  # starlette turns multipart limit and syntax errors into 400s
        detail = str(exc.detail)
        if "Too many files" in detail or "Too many fields" in detail:
            shown = settings.max_files if limit is None else limit
            raise ApiError(413, "too_many_files", f"{detail} ({limit_name}={shown})") from None
        raise ApiError(400, "bad_multipart", f"could not parse the multipart body: {detail}") from None


async def _read_upload(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "image_too_large", f"{what} is larger than {limit} bytes (RMT_MAX_IMAGE_BYTES)")
    return data


def read_config_json(raw: str) -> dict[str, Any]:
    """A config form part as one flat JSON object (what every config field holds); 422 naming what is wrong."""
    if len(raw) > MAX_CONFIG_CHARS:
        raise ApiError(422, "invalid_config", f"config is {len(raw)} characters; the limit is {MAX_CONFIG_CHARS}")
    try:
        user = json.loads(raw, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_config", f"config is not valid JSON: {exc.msg} at character {exc.pos}") \
            from None
    except ValueError as exc:  # NaN / Infinity
        raise ApiError(422, "invalid_config", f"config: {exc}") from None
    except RecursionError:  # [[[[...: the parser recurses once per level
        raise ApiError(422, "invalid_config", "config is nested too deeply; it is one flat JSON object of "
                                              "TuneConfig fields") from None
    if not isinstance(user, dict):
        raise ApiError(422, "invalid_config", "config must be a JSON object")
    # Every field is a scalar: refuse nesting here, before anything formats the value into a message.
    nested = sorted(name for name, value in user.items() if isinstance(value, (dict, list)))
    if nested:
        raise ApiError(422, "invalid_config", f"config field(s) {', '.join(map(repr, nested))[:300]} hold nested "
                                              "JSON; every TuneConfig field is a string, number, boolean or null")
    return user


def parse_config(raw: str | None, settings: Settings) -> dict[str, Any]:
    """The request's config JSON over the operator's defaults, validated by TuneConfig."""
    values: dict[str, Any] = {"backbone": settings.default_backbone, "pretrained": settings.default_pretrained}
    if raw is not None and raw.strip():
        values.update(read_config_json(raw))
    _check_allowed(values, settings)
    try:
        return TuneConfig.from_dict(values).to_dict()
    except ValueError as exc:
        raise ApiError(422, "invalid_config", f"config: {exc}") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number a config may hold; use finite numbers")


def _check_allowed(values: dict[str, Any], settings: Settings) -> None:
    """backbone and pretrained come from the operator's allow-lists: a request never names a file the worker
    would read (and unpickle), nor a model it cannot load, and an unknown one fails here, not a minute later."""
    backbones = settings.backbone_allow_list()
    if values.get("backbone") not in backbones:
        raise ApiError(422, "invalid_config", f"config.backbone={values.get('backbone')!r} is not offered here; "
                                              f"choose one of {', '.join(backbones)} (RMT_ALLOWED_BACKBONES)")
    allowed = settings.pretrained_allow_list()
    if values.get("pretrained") not in allowed:
        shown = ", ".join("null" if p is None else repr(p) for p in allowed)
        raise ApiError(422, "invalid_config", f"config.pretrained={values.get('pretrained')!r} is not offered here; "
                                              f"choose one of {shown} (RMT_ALLOWED_PRETRAINED)")


def check_schedule(config: dict[str, Any], samples: list[Sample], settings: Settings) -> dict[str, Any]:
    """Epochs x batches (raised by min_steps) within RMT_MAX_TUNE_STEPS: each field alone is bounded, their
    product with the upload's size is what costs GPU time."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.label] = counts.get(sample.label, 0) + 1
    tune = TuneConfig.from_dict(config)
    plan = tune.schedule(list(counts.values()))
    if plan["total_steps"] > settings.max_tune_steps:
        raise ApiError(422, "too_much_work",
                       f"config asks for {plan['total_steps']} optimizer steps ({plan['epochs']} epochs x "
                       f"{plan['steps_per_epoch']} batches of {tune.batch_size} from {plan['n_train']} training "
                       f"images); the limit is {settings.max_tune_steps} (RMT_MAX_TUNE_STEPS). Lower epochs or "
                       "min_steps, or raise batch_size")
    return plan


async def parse_create(request: Request, settings: Settings) -> CreateRequest:
    """The create request's name, config and images (files+labels or one zip archive)."""
    form = await read_form(request, settings, max_files=settings.max_files + 1)
    try:
        name = form.get("name") or ""
        if not isinstance(name, str):
            raise ApiError(400, "invalid_name", "name must be a text field, not a file")
        name = unicodedata.normalize("NFC", name).strip()
        if len(name) > MAX_NAME_LENGTH:
            raise ApiError(400, "invalid_name", f"name is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
        raw_config = form.get("config")
        if raw_config is not None and not isinstance(raw_config, str):
            raise ApiError(422, "invalid_config", "config must be a text field holding a JSON object")
        config = parse_config(raw_config, settings)

        files, labels, archive = form.getlist("files"), form.getlist("labels"), form.getlist("archive")
        if archive and files:
            raise ApiError(400, "ambiguous_upload", "send either files+labels or one archive, not both")
        if len(archive) > 1:
            raise ApiError(400, "ambiguous_upload", f"send one archive, got {len(archive)}")
        if archive:
            if labels:
                raise ApiError(400, "ambiguous_upload", "labels come from the archive's folders; drop the labels field")
            samples = await _samples_from_archive(archive[0], settings)
        elif files:
            samples = await _samples_from_files(files, labels, settings)
        else:
            raise ApiError(400, "no_images", "no images: send repeated 'files' parts with a parallel 'labels' "
                                             "field, or one 'archive' zip with a folder per class")
        _check_classes(samples, settings)
        schedule = check_schedule(config, samples, settings)
        return CreateRequest(name=name, config=config, samples=samples, schedule=schedule)
    finally:
        await form.close()


async def _samples_from_files(files: list, labels: list, settings: Settings) -> list[Sample]:
    if len(files) > settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files; the limit is {settings.max_files} (RMT_MAX_FILES)")
    if len(labels) != len(files):
        raise ApiError(400, "labels_mismatch",
                       f"got {len(files)} files and {len(labels)} labels; send one 'labels' value per file, in order")
    samples = []
    for i, (upload, raw_label) in enumerate(zip(files, labels)):
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "invalid_file", f"files[{i}] is a text field; send it as a file part")
        if not isinstance(raw_label, str):
            raise ApiError(400, "invalid_label", f"labels[{i}] is a file; send it as a text field")
        label = clean_label(raw_label, settings, f"labels[{i}]")
        what = f"files[{i}] ({display_name(upload.filename)})"
        data = await _read_upload(upload, settings.max_image_bytes, what)
        samples.append(Sample(data=data, label=label, original_name=display_name(upload.filename)))
    await run_in_threadpool(_validate_images, samples, settings)
    return samples


def decode_all(blobs: list[tuple[bytes, str]], settings: Settings, budget: PixelBudget | None = None) -> list[Image.Image]:
    """Decode every (data, what) pair. Undecodable images do not stop the loop: one error names every bad file,
    so a user fixes them all at once; a limit (413) still rejects at once, since the rest cannot help."""
    images, bad = [], []
    for data, what in blobs:
        try:
            images.append(decode_image(data, settings, what, budget))
        except ApiError as exc:
            if exc.status == 413:
                raise
            bad.append(exc)
    if len(bad) == 1:
        raise bad[0]
    if bad:
        status = bad[0].status if len({e.status for e in bad}) == 1 else 400
        raise ApiError(status, bad[0].code if len({e.code for e in bad}) == 1 else "invalid_image",
                       f"{len(bad)} files cannot be used: " + "; ".join(e.message for e in bad))
    return images


def _validate_images(samples: list[Sample], settings: Settings) -> None:
    """Decode every image (off the event loop); bad ones reject the whole request, all named in one error."""
    budget = PixelBudget(settings.max_request_pixels, "RMT_MAX_REQUEST_PIXELS")
    decode_all([(sample.data, f"files[{i}] ({sample.original_name})") for i, sample in enumerate(samples)],
               settings, budget)
    for sample in samples:
        sample.ext = image_extension(sample.data)


def display_name(name: str | None) -> str:
    """A client's file name for messages only (never a path): printable, bounded."""
    text = "".join(ch for ch in (name or "unnamed") if ch.isprintable())
    return text[:120] or "unnamed"


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or "\\" in name or ".." in parts or ":" in parts[0]
            or any(unicodedata.category(ch) == "Cc" for ch in name))


async def _samples_from_archive(upload: Any, settings: Settings) -> list[Sample]:
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "bad_archive", "archive must be a file part (a zip)")
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large", f"archive is larger than {settings.max_upload_bytes} bytes")
    return await run_in_threadpool(_archive_samples, data, settings)


def _archive_samples(data: bytes, settings: Settings) -> list[Sample]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError):
        raise ApiError(400, "bad_archive", "archive is not a readable zip file") from None
    with zf:
        members = zf.infolist()
        if len(members) > settings.max_archive_members:
            raise ApiError(413, "too_many_files", f"archive has {len(members)} entries; the limit is "
                                                  f"{settings.max_archive_members} (RMT_MAX_ARCHIVE_MEMBERS)")
        budget = PixelBudget(settings.max_request_pixels, "RMT_MAX_REQUEST_PIXELS")
        entries = []  # (info, path parts): what is not hidden (README "Zip rules"; app/static/ui/zip.js too)
        for info in members:
            if _unsafe_member(info.filename):
                raise ApiError(400, "unsafe_archive_path",
                               f"archive member {display_name(info.filename)!r} is an absolute path or climbs out "
                               "with '..'; refusing the archive")
            parts = [p for p in info.filename.split("/") if p]
            if parts and parts[0] != "__MACOSX" and not any(p.startswith(".") for p in parts):
                entries.append((info, parts))
        # Images by name; other files (Thumbs.db, desktop.ini, notes.txt) are left out, as the page does, and a
        # file beside the class folders is not a class folder.
        def is_image(info: zipfile.ZipInfo, parts: list[str]) -> bool:
            return not info.is_dir() and parts[-1].lower().endswith(IMAGE_SUFFIXES)

        def in_folders(entries: list) -> list:
            return [(info, parts) for info, parts in entries
                    if info.is_dir() or len(parts) >= 2 or is_image(info, parts)]

        entries = in_folders(entries)
        files = [(info, parts) for info, parts in entries if is_image(info, parts)]
        if len(files) > settings.max_files:
            raise ApiError(413, "too_many_files",
                           f"archive has {len(files)} images; the limit is {settings.max_files} (RMT_MAX_FILES)")
        # One wrapper folder around the class folders (a zipped directory) is common: look through it.
        if files and len({parts[0] for _, parts in entries}) == 1 and all(len(p) >= 3 for _, p in files):
            entries = in_folders([(info, parts[1:]) for info, parts in entries if len(parts) > 1])
            files = [(info, parts[1:]) for info, parts in files]
        loose = ["/".join(parts) for _, parts in files if len(parts) < 2]
        if loose:
            raise ApiError(400, "archive_layout",
                           f"archive file {display_name(loose[0])!r} is not inside a class folder; "
                           "put each class's images in a top-level folder named after the class")
        total = extracted = 0
        samples = []
        for info, parts in files:
            what = f"archive member {display_name(info.filename)!r}"
            if info.flag_bits & 0x1:
                raise ApiError(400, "bad_archive", f"{what} is encrypted")
            if info.file_size > settings.max_image_bytes:
                raise ApiError(413, "image_too_large", f"{what} is {info.file_size} bytes; the limit is "
                                                       f"{settings.max_image_bytes} (RMT_MAX_IMAGE_BYTES)")
            total += info.file_size
            if total > settings.max_upload_bytes:
                raise ApiError(413, "payload_too_large",
                               f"archive expands past {settings.max_upload_bytes} bytes (RMT_MAX_UPLOAD_BYTES)")
            try:
                with zf.open(info) as fh:
                    content = fh.read(settings.max_image_bytes + 1)  # never trust the declared size
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, RuntimeError):
                raise ApiError(400, "bad_archive", f"{what} cannot be extracted: it is corrupt, encrypted or "
                                                   "compressed with a method other than deflate") from None
            if len(content) > settings.max_image_bytes:
                raise ApiError(413, "image_too_large", f"{what} is larger than {settings.max_image_bytes} bytes")
            extracted += len(content)  # what it really expanded to: declared sizes can lie
            if extracted > settings.max_upload_bytes:
                raise ApiError(413, "payload_too_large",
                               f"archive expands past {settings.max_upload_bytes} bytes (RMT_MAX_UPLOAD_BYTES)")
            label = clean_label(parts[0], settings, f"archive folder {display_name(parts[0])!r}")
            decode_image(content, settings, what, budget)
            samples.append(Sample(data=content, label=label, ext=image_extension(content),
                                  original_name=display_name("/".join(parts))))
        with_images = {parts[0] for _, parts in files}
        empty = sorted({parts[0] for _, parts in entries} - with_images)
        if empty:
            raise ApiError(400, "empty_class", f"class folder {display_name(empty[0])!r} has no images")
        return samples


def _check_classes(samples: list[Sample], settings: Settings) -> None:
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.label] = counts.get(sample.label, 0) + 1
    if len(counts) < 2:
        raise ApiError(400, "too_few_classes",
                       f"a classifier needs at least 2 classes; got {len(counts)} ({', '.join(counts) or 'none'})")
    if len(counts) > settings.max_classes:
        raise ApiError(400, "too_many_classes",
                       f"{len(counts)} classes; the limit is {settings.max_classes} (RMT_MAX_CLASSES)")
