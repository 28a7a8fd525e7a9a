"""ClassifierStore: generated names, atomic create/publish, tenant ownership, job compare-and-set."""
from __future__ import annotations

import json
import threading

import pytest

from rmt_core.store import ClassifierStore, JobRecord, Sample, StoreError, write_json_atomic


def _samples():
    return [Sample(b"\x89PNG fake", "cat", ".png", "../../etc/passwd"), Sample(b"jpeg", "dog", ".jpg", "d.jpg"),
            Sample(b"x", "dog", "/../../x", "x")]


def test_create_uses_generated_names_only(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    record, job = store.create_classifier("acme", "pets", _samples(), {"method": "r-amt"})
    directory = store.classifier_dir(record.classifier_id)
    assert sorted(p.name for p in (directory / "uploads").iterdir()) == ["00000.png", "00001.jpg", "00002.img"]
    assert [label for _, label in store.samples(record.classifier_id)] == ["cat", "dog", "dog"]
    assert record.labels == ["cat", "dog"] and job.status == "queued" and job.tenant == "acme"
    assert not (tmp_path / "etc").exists()
    assert list(store.tmp_dir.iterdir()) == []  # staging renamed away


def test_ids_are_checked_before_they_touch_a_path(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    for bad in ("../x", "clf_../../etc", "clf_" + "g" * 24, "", "job_" + "0" * 24):
        assert store.get_classifier(bad) is None
        assert store.model_dir(bad) is None
        with pytest.raises(StoreError):
            store.classifier_dir(bad)
    assert store.get_job("../../etc/passwd") is None


def test_tenants_see_only_their_own(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    a, job_a = store.create_classifier("a", "", _samples(), {})
    b, _ = store.create_classifier("b", "", _samples(), {})
    assert store.get_classifier(a.classifier_id, "b") is None and store.get_job(job_a.job_id, "b") is None
    assert store.get_classifier(a.classifier_id, "a").classifier_id == a.classifier_id
    assert [r.classifier_id for r in store.list_classifiers("b")[0]] == [b.classifier_id]
    assert store.count_active_jobs("a") == 1 and store.count_active_jobs(None) == 2


def test_publish_is_all_or_nothing_and_never_replaces(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    record, _ = store.create_classifier("t", "", _samples(), {})
    cid = record.classifier_id
    build = store.new_build_dir(cid)
    (build / "model.onnx").write_bytes(b"half")
    with pytest.raises(StoreError, match="incomplete"):
        store.publish(cid, build)  # no manifest yet: refused
    assert store.model_dir(cid) is None
    write_json_atomic(build / "manifest.json", {"labels": ["cat", "dog"]})
    assert store.publish(cid, build) == store.classifier_dir(cid) / "model"
    assert store.model_dir(cid) is not None and not build.exists()
    second = store.new_build_dir(cid)
    write_json_atomic(second / "manifest.json", {"labels": ["other"]})
    with pytest.raises(StoreError, match="already"):
        store.publish(cid, second)
    assert json.loads((store.model_dir(cid) / "manifest.json").read_text())["labels"] == ["cat", "dog"]
    with pytest.raises(StoreError):
        store.publish(cid, tmp_path)  # not a build dir of this store


def test_publish_after_delete_fails_cleanly(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    record, job = store.create_classifier("t", "", _samples(), {})
    build = store.new_build_dir(record.classifier_id)
    write_json_atomic(build / "manifest.json", {"labels": []})
    assert store.delete_classifier(record.classifier_id)
    assert store.get_job(job.job_id) is None
    with pytest.raises(StoreError, match="no longer exists"):
        store.publish(record.classifier_id, build)
    assert not store.delete_classifier(record.classifier_id)


def test_update_job_is_a_compare_and_set(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    _, job = store.create_classifier("t", "", _samples(), {})
    winners = []

    def claim(name):
        def mutate(j: JobRecord):
            if j.status != "queued":
                return False
            j.status, j.lease_owner = "running", name
            winners.append(name)
        store.update_job(job.job_id, mutate)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and store.get_job(job.job_id).lease_owner == winners[0]
    assert store.update_job("job_" + "0" * 24, lambda j: None) is None


def test_failed_create_leaves_nothing(tmp_path, monkeypatch):
    store = ClassifierStore(tmp_path / "data")
    import rmt_core.store as mod

    def broken_rename(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(mod.os, "rename", broken_rename)
    with pytest.raises(OSError):
        store.create_classifier("t", "", _samples(), {})
    monkeypatch.undo()
    assert list(store.classifiers_dir.iterdir()) == [] and list(store.jobs_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_cleanup_tmp_removes_only_old_leftovers(tmp_path):
    store = ClassifierStore(tmp_path / "data")
    record, _ = store.create_classifier("t", "", _samples(), {})
    old = store.new_build_dir(record.classifier_id)
    import os
    os.utime(old, (1, 1))
    fresh = store.new_build_dir(record.classifier_id)
    assert store.cleanup_tmp(3600) == 1 and not old.exists() and fresh.exists()
    store.check_writable()
