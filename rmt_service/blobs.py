"""Immutable blobs under ``<data_dir>/blobs/``: written once to a temporary name, renamed into place, never changed.

    blobs/uploads/<classifier_id>/00000.png   a classifier's images (the directory appears by one rename)
    blobs/versions/<version_id>/              a published version's artifacts (manifest.json, mask, head, ...)
    blobs/bases/<base_id>/                    a shared frozen encoder (exported by rmt_core into staging given
                                              here, content-addressed)
    blobs/tmp/<kind>-<uuid>@<host>.<pid>.<start>  staging on the same filesystem, so publishing is a rename

Nothing here is ever modified after the rename, so any shared volume (NFS, EFS, a compose volume) is
safe with no locking; which blobs exist *for the service* is decided by database rows, and blobs no
row refers to are collected later (``unreferenced``, with a grace period for writes in flight).
Keys are built here from generated ids and checked against a strict pattern before they touch a path.

Every staging entry names the process that made it (host, pid and the pid's start time, so a reused pid
does not look alive), so what a crashed process left is recognised at once on its own host and removed at
start-up and by collection instead of after an hour; a build directory also belongs to its job, and the
store keeps it while that job runs (``Store.collect_garbage``), however long it tunes.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

KINDS = ("uploads", "versions", "bases")
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}"
_KEY = re.compile(rf"^(uploads|versions|bases)/{_PART}(/{_PART})?$")
_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
# A staging entry made by another host (whose processes cannot be checked from here) is kept this long
# after its last write; one made here is judged by whether its process still runs.
FOREIGN_STAGING_GRACE_S = 3600.0
# A crashed base export of an older release (``bases/.<base_id>.*``) is kept this long after its last write.
LEGACY_BASE_STAGING_GRACE_S = 300.0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _machine() -> str:
    """This host, pid namespace and boot, as one name: pids are only comparable between processes that share
    all three (two containers with the same hostname have different pid namespaces)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    return _HOST_CHARS.sub("_", "_".join(parts))[:80] or "host"


_TOKENS: dict[int, str] = {}


def process_token() -> str:
    """``machine.pid.start`` of this process: unique on its machine even when pids are reused (containers
    restart as pid 1), so a staging entry tells whether the process that writes it still runs."""
    pid = os.getpid()  # a forked pool process gets its own
    if pid not in _TOKENS:
        _TOKENS[pid] = f"{_machine()}.{pid}.{_start_time(pid) or 0}"
    return _TOKENS[pid]


def staging_owner_alive(name: str, host: str | None = None) -> bool | None:
    """Whether the process that made staging entry ``name`` runs: True/False on this machine, None elsewhere
    (or for a name without an owner)."""
    _, at, token = name.rpartition("@")
    if not at:
        return None
    owner_host, _, rest = token.rpartition(".")
    owner_host, _, pid = owner_host.rpartition(".")
    host = host if host is not None else process_token().rsplit(".", 2)[0]
    if owner_host != host or not pid.isdigit():
        return None
    return _start_time(int(pid)) == rest


def newest_mtime(path: Path) -> float:
    """The latest mtime of ``path`` and anything under it (a directory's own mtime misses writes to its files)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
        """An empty directory under blobs/tmp (same filesystem as its destination), named after its process."""
        path = self.tmp / f"{kind}-{uuid.uuid4().hex}@{process_token()}"
        path.mkdir()
        return path

    def base_staging(self) -> Path:
        """Where rmt_core exports a new base before renaming it into ``bases/`` (see rmt_core.base.ensure_base)."""
        path = self.staging_dir("base")
        os.chmod(path, 0o755)
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

    def unput(self, key: str, staging: Path) -> None:
        """Undo ``put_dir`` whose records were not committed: the blob goes back to its staging name (removed
        if that fails), so no row-less blob is left and the caller can publish it again."""
        try:
            if Path(staging).parent != self.tmp:
                raise OSError(f"{staging} is not a staging directory of this blob store")
            os.rename(self.path(key), staging)
        except OSError:
            self.delete(key)

    def delete(self, key: str) -> None:
        """Remove a blob no row refers to any more (rename away first, so readers never see half of it)."""
        trash = self.take_away(key)
        if trash is not None:
            _remove(trash)

    def take_away(self, key: str) -> Path | None:
        """Rename a blob out of sight into blobs/tmp (one atomic step); the caller removes it, or ``restore``s it.
        None if it was not there."""
        trash = self.tmp / f"trash-{uuid.uuid4().hex}@{process_token()}"
        try:
            os.rename(self.path(key), trash)
        except FileNotFoundError:
            return None
        return trash

    def restore(self, trash: Path, key: str) -> None:
        os.rename(trash, self.path(key))

    def delete_taken(self, trash: Path) -> None:
        if Path(trash).parent == self.tmp:
            _remove(Path(trash))

    def discard(self, staging: Path) -> None:
        if Path(staging).parent == self.tmp:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------ upkeep
    def cleanup_tmp(self, older_than_s: float = FOREIGN_STAGING_GRACE_S, now: float | None = None,
                    build_owned: Callable[[str], bool] | None = None) -> int:
        """Remove staging no live process or job owns; returns how many entries.

        A build directory (``build-<classifier_id>-...``) is kept exactly while ``build_owned(classifier_id)``
        says its job runs; without that answer it is judged like the rest. Anything else (uploads being
        written, base exports, blobs being deleted) is kept while the process that made it runs here, or (made on another host, or by an older
        release that did not name itself) until ``older_than_s`` after its last write.
        """
        now = time.time() if now is None else now
        removed = 0
        for path in list(self.tmp.iterdir()):
            name = path.name
            try:
                if build_owned is not None and name.startswith("build-clf_"):
                    stale = (staging_owner_alive(name) is False
                             or not build_owned(name[len("build-"):].split("-", 1)[0]))
                else:
                    alive = staging_owner_alive(name)
                    stale = alive is False or (alive is None and now - newest_mtime(path) > older_than_s)
            except FileNotFoundError:
                continue
            if stale:
                _remove(path)
                removed += 1
        return removed

    def cleanup_base_staging(self, older_than_s: float = LEGACY_BASE_STAGING_GRACE_S, now: float | None = None) -> int:
        """Remove crashed base exports of older releases (``bases/.<base_id>.*``, written in place)."""
        now = time.time() if now is None else now
        removed = 0
        for path in list(self.bases_dir.iterdir()):
            if path.name.startswith(".") and not path.name.startswith(".probe"):
                with contextlib.suppress(FileNotFoundError):
                    if now - newest_mtime(path) > older_than_s:
                        _remove(path)
                        removed += 1
        return removed

    def free_bytes(self) -> int:
        """Bytes a writer may still use on the blob volume."""
        return shutil.disk_usage(self.root).free

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
