"""What the sync and async clients share: turning user inputs into multipart parts, and answers into results.

Nothing here does I/O over the network, so both clients stay a thin layer of request calls.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence, Union

import httpx

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FINISHED = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"

PathLike = Union[str, "os.PathLike[str]"]
# What create() accepts: a folder with one subfolder per class, a zip with one top-level folder per class,
# or (image, label) pairs where the image is a path, bytes or a PIL image.
Samples = Union[PathLike, Iterable[tuple[Any, str]]]


class RmtError(Exception):
    """An error answer from the service: HTTP status, machine-readable code and the service's message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class JobFailed(RmtError):
    """wait() saw the job end as failed or cancelled; ``job`` is its last state."""

    def __init__(self, job: dict):
        error = job.get("error") or {}
        super().__init__(200, error.get("code") or job["status"],
                         error.get("message") or f"job {job['job_id']} ended {job['status']}")
        self.job = job


@dataclass(frozen=True)
class Created:
    classifier_id: str
    job_id: str


def check(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded, else RmtError with the service's code and message."""
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    raise RmtError(response.status_code, code, message)


def created_from(response: httpx.Response) -> Created:
    """The answer to POST /v1/classifiers."""
    body = check(response).json()
    return Created(classifier_id=body["classifier_id"], job_id=body["job_id"])


def next_page_params(page: Mapping[str, Any], page_size: int) -> dict[str, Any] | None:
    """The query for the page after ``page`` of GET /v1/classifiers (by cursor, or by offset from a service
    without cursors), or None when it was the last."""
    if page.get("next_cursor"):
        return {"limit": page_size, "cursor": page["next_cursor"]}
    if "next_cursor" not in page and page["offset"] + len(page["items"]) < page["total"] and page["items"]:
        return {"limit": page_size, "offset": page["offset"] + len(page["items"])}
    return None


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def wait_is_over(state: dict, raise_on_failure: bool, deadline: float | None, timeout: float | None) -> bool:
    """For wait(): True when the job has finished; JobFailed if it failed or was cancelled (and
    ``raise_on_failure``), TimeoutError once ``deadline`` has passed; False to poll again."""
    if state["status"] in FINISHED:
        if raise_on_failure and state["status"] != "succeeded":
            raise JobFailed(state)
        return True
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {state['job_id']} still {state['status']} after {timeout} s")
    return False


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The images in ``folder`` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _image_part(image: Any, index: int) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) for a path, bytes or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{index}", bytes(image), "application/octet-stream"
    if hasattr(image, "save") and hasattr(image, "size"):  # a PIL image; PNG keeps its pixels exact
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        name = Path(getattr(image, "filename", "") or f"image-{index}.png").name
        return name, buf.getvalue(), "image/png"
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes or a PIL image")


def create_parts(source: Samples, name: str | None, config: Mapping[str, Any] | None
                 ) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, Any]]:
    """multipart ``files`` and ``data`` for POST /v1/classifiers."""
    data: dict[str, Any] = {}
    if name:
        data["name"] = name
    if config:
        data["config"] = json.dumps(dict(config))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file() and zipfile.is_zipfile(path):
            return [("archive", (path.name, path.read_bytes(), "application/zip"))], data
        if path.is_dir():
            if (path / "train").is_dir() and any(p.is_dir() for p in (path / "train").iterdir()):
                path = path / "train"  # a train/test tree (as `rmt tune` takes): upload the training split
            classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not classes:
                raise ValueError(f"{path} has no class folders: lay images out as {path}/<label>/<image>")
            pairs = []
            for folder in classes:
                images = image_files(folder)
                if not images:
                    raise ValueError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                pairs += [(image, folder.name) for image in images]
        else:
            raise ValueError(f"{path} is neither a folder of class folders nor a zip file")
    else:
        pairs = list(source)
    if not pairs:
        raise ValueError("no images to upload")
    files, labels = [], []
    for i, (image, label) in enumerate(pairs):
        files.append(("files", _image_part(image, i)))
        labels.append(str(label))
    data["labels"] = labels
    return files, data


def update_parts(add: Samples | None, remove_labels: Sequence[str] | None, include_feedback: bool,
                 config: Mapping[str, Any] | None, force: bool) -> list[tuple[str, tuple[str | None, Any, ...]]]:
    """multipart parts for POST /v1/classifiers/{id}/versions (always multipart, even without images)."""
    parts: list = []
    if add is not None:
        files, data = create_parts(add, None, None)
        parts += files + [("labels", (None, label)) for label in data["labels"]]
    parts += [("remove_labels", (None, str(label))) for label in remove_labels or ()]
    parts.append(("include_feedback", (None, "true" if include_feedback else "false")))
    values = {**dict(config or {}), **({"force": True} if force else {})}
    if values:
        parts.append(("config", (None, json.dumps(values))))
    return parts


def feedback_parts(image: Any, label: str, prediction: str | None) -> list:
    parts: list = [("file", _image_part(image, 0)), ("label", (None, label))]
    if prediction:
        parts.append(("prediction", (None, prediction)))
    return parts


def expand_images(images: Any) -> list[Any]:
    """One image, a folder (its images, sorted) or a list of either, as a flat list."""
    single = (str, os.PathLike, bytes, bytearray, memoryview)  # one image, though some of these are sequences
    if isinstance(images, single) or not isinstance(images, Sequence):
        images = [images]
    flat: list[Any] = []
    for image in images:
        if isinstance(image, (str, os.PathLike)) and Path(image).is_dir():
            found = image_files(Path(image))
            if not found:
                raise ValueError(f"{image} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            flat.extend(found)
        else:
            flat.append(image)
    if not flat:
        raise ValueError("no images to classify")
    return flat


def classify_parts(batch: list[Any], offset: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", _image_part(image, offset + i)) for i, image in enumerate(batch)]


def classify_results(response: httpx.Response, batch: list[Any]) -> list[dict]:
    """The service's results for one batch, each with the local path when the image was a file."""
    results = check(response).json()["results"]
    out = []
    for image, result in zip(batch, results):
        item = dict(result)
        if isinstance(image, (str, os.PathLike)):
            item["path"] = str(image)
        out.append(item)
    return out


def job_id_of(job_or_created: Any) -> str:
    if isinstance(job_or_created, Created):
        return job_or_created.job_id
    if isinstance(job_or_created, Mapping):
        return job_or_created["job_id"]
    return str(job_or_created)


@contextlib.contextmanager
def download_file(path: PathLike) -> Iterator[BinaryIO]:
    """A file to write a download into: it is written under a temporary name and renamed to ``path`` when the
    block ends without error (removed otherwise), so a cut-off download never leaves a file that looks complete."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with open(tmp, "wb") as fh:
            yield fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
