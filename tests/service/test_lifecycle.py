"""One owner for every blob: nothing a queued or running job uses is collected, staging nothing live owns is
removed at once (not after an hour), bases register idempotently and never vanish under a publish."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest

from rmt_service.store import Sample, Store, StoreError

HOURS_AGO = (1.0, 1.0)  # an mtime long past every grace period


def _samples():
    return [Sample(b"png", "cat", ".png"), Sample(b"jpg", "dog", ".jpg")]


def _create(store: Store, backbone: str = "rmt-tiny-vit", pretrained: str = "builtin"):
    return store.create_classifier("t", "", _samples(), {"backbone": backbone, "pretrained": pretrained})


def _base(store: Store, base_id: str, backbone: str = "rmt-tiny-vit", pretrained: str | None = "builtin"):
    path = store.blobs.root / "bases" / base_id
    path.mkdir()
    (path / "base.json").write_text(json.dumps({"base_id": base_id, "backbone": backbone, "pretrained": pretrained}))
    os.utime(path, HOURS_AGO)
    return path


def _build(store: Store, classifier_id: str, manifest: dict):
    build = store.new_build_dir(classifier_id)
    (build / "manifest.json").write_text(json.dumps(manifest))
    return build


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_jobs_build_dir_is_never_collected(store):
    record, job = _create(store)
    assert store.claim(job.job_id, "w")[0] == "run"
    build = store.new_build_dir(record.classifier_id)  # empty until tuning ends, hours later
    os.utime(build, HOURS_AGO)
    store.collect_garbage(grace_s=3600)
    assert build.is_dir()
    (build / "manifest.json").write_text(json.dumps({"labels": []}))
    store.publish_version(record.classifier_id, build, job_id=job.job_id, owner="w")
    assert store.current_version(record.classifier_id) is not None


def test_a_finished_jobs_build_dir_is_collected_at_once(store):
    record, job = _create(store)
    store.claim(job.job_id, "w")
    build = store.new_build_dir(record.classifier_id)
    store.finish_job(job.job_id, "w", "failed", {"code": "x", "message": "x"})
    store.collect_garbage(grace_s=3600)
    assert not build.exists()


def test_a_base_an_active_job_uses_is_never_collected(store):
    used, other = _base(store, "b" * 32), _base(store, "c" * 32, backbone="rmt-world-vit")
    _, job = _create(store)
    assert store.collect_garbage(base_grace_s=0)["bases"] == 1  # queued: its backbone's base stays
    assert used.is_dir() and not other.exists()
    store.claim(job.job_id, "w")
    store.collect_garbage(base_grace_s=0)
    assert used.is_dir()  # running
    store.finish_job(job.job_id, "w", "failed", {"code": "x", "message": "x"})
    assert store.collect_garbage(base_grace_s=0)["bases"] == 1
    assert not used.exists()


def test_no_publish_slips_in_between_a_bases_collection_and_its_removal(store):
    """A publish that commits right after the collecting transaction must not point a version at a gone base."""
    base_id = "d" * 32
    base = _base(store, base_id)
    record, job = _create(store, backbone="rmt-world-vit")
    store.claim(job.job_id, "w")
    write, published = store.db.write, {}

    @contextlib.contextmanager
    def write_then_publish():
        with write() as conn:
            yield conn
        if not published:
            published["tried"] = True
            try:
                published["version"] = store.publish_version(
                    record.classifier_id, _build(store, record.classifier_id, {"labels": [], "base_id": base_id}),
                    job_id=job.job_id, owner="w")
            except StoreError as exc:
                published["refused"] = str(exc)

    store.db.write = write_then_publish
    try:
        store.collect_garbage(base_grace_s=0)
    finally:
        store.db.write = write
    assert published.get("tried")
    if "version" in published:
        assert base.is_dir(), "a version was published on a base that collection then removed"
    else:
        assert "no longer stored" in published["refused"] and store.current_version(record.classifier_id) is None


def test_registering_a_base_is_idempotent_under_concurrency(store):
    """Two jobs publish their first version on a new backbone at once: the second waits for the first's base row
    and publishes too (no UniqueViolation)."""
    from sqlalchemy import insert

    from rmt_service.db import bases

    base_id = "e" * 32
    _base(store, base_id)
    record, job = _create(store)
    store.claim(job.job_id, "w")
    manifest = {"labels": [], "base_id": base_id, "backbone": "rmt-tiny-vit", "pretrained": "builtin"}
    if store.db.is_sqlite:  # one writer at a time: the race cannot happen here
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE)")
    outcome: dict[str, object] = {}

    def publish():
        try:
            outcome["b"] = store.publish_version(record.classifier_id, _build(store, record.classifier_id, manifest),
                                                 job_id=job.job_id, owner="w")
        except Exception as exc:  # the assertion below names it
            outcome["b"] = exc

    with store.db.write() as conn:  # the other job's publish: its base row inserted, not yet committed
        conn.execute(insert(bases).values(base_id=base_id, backbone="rmt-tiny-vit", pretrained="builtin",
                                          blob_key=f"bases/{base_id}", created_at=0.0))
        thread = threading.Thread(target=publish)
        thread.start()
        _wait_for_lock_wait(store)
    thread.join(30)
    assert not isinstance(outcome.get("b"), Exception), outcome
    assert store.current_version(record.classifier_id).base_id == base_id


def _wait_for_lock_wait(store: Store) -> None:
    """Until some session of this database waits for a lock (the second insert behind the first's row)."""
    import time

    from sqlalchemy import text

    for _ in range(200):
        with store.db.read() as conn:
            if conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar():
                return
        time.sleep(0.05)
    raise AssertionError("the second publish never waited on the first one's base row")


def test_staging_of_dead_processes_is_removed_at_start_up(store, settings):
    """Crashed uploads, base exports and killed builds: gone at the next start, whatever their age."""
    from rmt_service.blobs import process_token

    dead = process_token().rsplit(".", 2)[0] + f".{_dead_pid()}.1"
    record, job = _create(store)
    leftovers = [store.blobs.tmp / f"put-{'1' * 32}@{dead}", store.blobs.tmp / f"base-{'2' * 32}@{dead}",
                 store.blobs.tmp / f"build-{record.classifier_id}-{'3' * 32}@{dead}",
                 store.blobs.root / "bases" / f".{'f' * 32}.x1y2z3"]
    for path in leftovers:
        path.mkdir()
        (path / "part").write_bytes(b"x")
    os.utime(leftovers[-1] / "part", HOURS_AGO)
    os.utime(leftovers[-1], HOURS_AGO)
    live_upload = store.blobs.staging_dir("put")  # this process is writing it now
    fresh = Store(settings)  # a process starting on this data dir
    try:
        fresh.clean_staging()
    finally:
        fresh.close()
    assert [p for p in leftovers if p.exists()] == []
    assert live_upload.is_dir()
    assert job.status == "queued"


def test_a_base_export_is_staged_through_the_blob_store(store, monkeypatch):
    """rmt_core writes a new base into staging the service gives it, and renames it into bases/."""
    from rmt_core import base as basemod

    seen = {}

    def fake_export(backbone, base_id, out, opset):
        seen["out"] = out
        (out / basemod.BASE_JSON).write_text(json.dumps({
            "base_id": base_id, "backbone": "x", "pretrained": None, "preprocess": {}, "feature_dim": 2,
            "maskable": {}, "opset": opset}))

    monkeypatch.setattr(basemod, "_export", fake_export)
    monkeypatch.setattr(basemod, "fingerprint", lambda visual, arch="": "a" * 32)
    backbone = type("B", (), {"model": type("M", (), {"visual": None})(), "name": "x"})()
    monkeypatch.setattr("rmt_core.masking.find_masks", lambda model: {})
    info = basemod.ensure_base(backbone, store.bases_dir, staging=store.blobs.base_staging)
    assert seen["out"].parent == store.blobs.tmp
    assert info.path == store.bases_dir / ("a" * 32) and (info.path / basemod.BASE_JSON).is_file()
    assert not seen["out"].exists()


# ------------------------------------------------------------------ /readyz answers 503 whenever a create would fail
def _ready(settings, queue=None):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.service.helpers import FakeQueue

    return TestClient(create_app(settings, queue=queue or FakeQueue()))


def test_readyz_is_503_below_the_free_space_floor(tmp_path, database_url):
    from tests.service.helpers import make_settings

    settings = make_settings(tmp_path / "data", database_url=database_url, min_free_bytes=2**62)
    with _ready(settings) as client:
        body = client.get("/readyz")
        assert body.status_code == 503 and body.json()["checks"]["space"] == "unavailable"
    with _ready(make_settings(tmp_path / "data", database_url=database_url, min_free_bytes=0)) as client:
        assert client.get("/readyz").status_code == 200


def test_readyz_is_503_while_the_records_database_is_locked(settings):
    from sqlalchemy import create_engine

    with _ready(settings) as client:
        assert client.get("/readyz").status_code == 200
        url = settings.effective_database_url
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as other:
                if url.startswith("sqlite"):
                    other.exec_driver_sql("BEGIN IMMEDIATE")  # another process holds the write lock
                else:
                    other.exec_driver_sql("BEGIN")
                    other.exec_driver_sql("LOCK TABLE classifiers IN ACCESS EXCLUSIVE MODE")
                answer = client.get("/readyz")
                other.exec_driver_sql("ROLLBACK")
        finally:
            engine.dispose()
        assert answer.status_code == 503 and answer.json()["checks"]["records"] == "unavailable"
        assert client.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_records_database_is_read_only(tmp_path):
    """SQLite opened read-only (a read-only mount, a file the service may not write)."""
    from tests.service.helpers import make_settings

    settings = make_settings(tmp_path / "data")
    with _ready(settings) as client:
        assert client.get("/readyz").status_code == 200
    read_only = make_settings(tmp_path / "data",
                              database_url=f"sqlite:///file:{settings.data_dir / 'rmt.sqlite'}?mode=ro&uri=true",
                              database_migrate=False)
    with _ready(read_only) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json()["checks"]["records"] == "unavailable"


def test_the_api_removes_uploads_a_crashed_api_left_when_it_starts(settings):
    from rmt_service.blobs import BlobStore, process_token

    dead = process_token().rsplit(".", 2)[0] + f".{_dead_pid()}.1"
    leftover = BlobStore(settings.data_dir).tmp / f"put-{'4' * 32}@{dead}"
    leftover.mkdir(parents=True)
    (leftover / "00000.png").write_bytes(b"half an upload")
    with _ready(settings):
        assert not leftover.exists()
