"""Immutable blobs under ``<data_dir>/blobs/``: written once to a temporary name, renamed into place, never changed.

    blobs/uploads/<classifier_id>/00000.png   a classifier's images (the directory appears by one rename)
    blobs/versions/<version_id>/              a published version's artifacts (manifest.json, mask, head, ...)
    blobs/bases/<base_id>/                    a shared frozen encoder (written by rmt_core, content-addressed)
    blobs/tmp/                                staging on the same filesystem, so publishing is a rename

Nothing here is ever modified after the rename, so any shared volume (NFS, EFS, a compose volume) is
safe with no locking; which blobs exist *for the service* is decided by database rows, and blobs no
row refers to are collected later (``unreferenced``, with a grace period for writes in flight).
Keys are built here from generated ids and checked against a strict pattern before they touch a path.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

KINDS = ("uploads", "versions", "bases")
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}"
_KEY = re.compile(rf"^(uploads|versions|bases)/{_PART}(/{_PART})?$")
_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")


class BlobError(RuntimeError):
    """A key that is not one of ours, or a blob that already exists / is missing."""


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class BlobStore:
    def __init__(self, data_dir: Path | str):
        self.root = Path(data_dir).resolve() / "blobs"
        self.tmp = self.root / "tmp"
        for d in (self.tmp, *(self.root / k for k in KINDS)):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ keys
    @staticmethod
    def check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
            raise BlobError(f"{key!r} is not a blob key")
        return key

    def path(self, key: str) -> Path:
        return self.root / self.check_key(key)

    @staticmethod
    def upload_key(classifier_id: str, idx: int, ext: str) -> str:
        ext = ext.lower() if _EXT.match((ext or "").lower()) else ".img"
        return BlobStore.check_key(f"uploads/{classifier_id}/{idx:05d}{ext}")

    @staticmethod
    def content_key(classifier_id: str, sha256: str, ext: str) -> str:
        """An image named by its content, beside the classifier's first uploads (deleted with them)."""
        ext = ext.lower() if _EXT.match((ext or "").lower()) else ".img"
        return BlobStore.check_key(f"uploads/{classifier_id}/{sha256}{ext}")

    @staticmethod
    def uploads_dir_key(classifier_id: str) -> str:
        return BlobStore.check_key(f"uploads/{classifier_id}")

    @staticmethod
    def version_key(version_id: str) -> str:
        return BlobStore.check_key(f"versions/{version_id}")

    @staticmethod
    def base_key(base_id: str) -> str:
        return BlobStore.check_key(f"bases/{base_id}")

    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    # ------------------------------------------------------------ writing
    def staging_dir(self, kind: str) -> Path:
        """An empty directory under blobs/tmp (same filesystem as its destination)."""
        path = self.tmp / f"{kind}-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def put_files(self, dir_key: str, files: dict[str, bytes]) -> Path:
        """Write ``{name: bytes}`` as one new directory blob (appears complete, by one rename)."""
        staging = self.staging_dir("put")
        try:
            for name, data in files.items():
                _write_file(staging / name, data)
            return self.put_dir(staging, dir_key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def put_file(self, key: str, data: bytes) -> Path:
        """Write one content-addressed file blob by rename; one that exists already has these bytes: kept."""
        target = self.path(key)
        if target.is_file():
            return target
        staging = self.staging_dir("file")
        try:
            _write_file(staging / "blob", data)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "blob", target)  # same name = same content: replacing a twin changes nothing
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def put_dir(self, staging: Path, key: str) -> Path:
        """Move a complete staging directory into place as ``key``; BlobError if ``key`` exists."""
        staging = Path(staging)
        if staging.parent != self.tmp:
            raise BlobError(f"{staging} is not a staging directory of this blob store")
        target = self.path(key)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, target)  # fails if target exists and is not empty: blobs are never replaced
        except OSError as exc:
            if target.exists():
                raise BlobError(f"blob {key} already exists") from exc
            raise
        fsync_dir(target.parent)
        return target

    def delete(self, key: str) -> None:
        """Remove a blob no row refers to any more (rename away first, so readers never see half of it)."""
        path = self.path(key)
        trash = self.tmp / f"trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def discard(self, staging: Path) -> None:
        if Path(staging).parent == self.tmp:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------ upkeep
    def cleanup_tmp(self, older_than_s: float, now: float | None = None) -> int:
        """Remove staging left by crashed processes; returns how many entries."""
        now = time.time() if now is None else now
        removed = 0
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > older_than_s:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()
                    removed += 1
        return removed

    def iter_keys(self, kind: str, older_than_s: float = 0.0, now: float | None = None) -> Iterator[str]:
        """Top-level blob keys of one kind whose mtime is older than ``older_than_s`` (for collection)."""
        now = time.time() if now is None else now
        with os.scandir(self.root / kind) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                        yield f"{kind}/{entry.name}"

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written, read back and removed on the blob volume."""
        probe = self.tmp / f".probe-{uuid.uuid4().hex}"
        _write_file(probe, b"ok")
        try:
            if probe.read_bytes() != b"ok":
                raise OSError("the blob volume did not read back a probe file")
        finally:
            probe.unlink()
