"""The store over SQLite and PostgreSQL: generated names, atomic create/publish, tenants, quota, the job state
machine's conditional updates, keyset pages, blob collection, migrations under concurrency."""
from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import func, select, update

from rmt_service import jobs as jobsm
from rmt_service.blobs import BlobError
from rmt_service.db import Database, db_now, job_counts, jobs
from rmt_service.migrate import current_revision, head_revision, upgrade_database
from rmt_service.store import QuotaExceeded, Sample, Store, StoreError
from tests.service.helpers import count_rows


def _samples():
    return [Sample(b"\x89PNG fake", "cat", ".png", "../../etc/passwd"), Sample(b"jpeg", "dog", ".jpg", "d.jpg"),
            Sample(b"x", "dog", "/../../x", "x")]


def _build(store: Store, classifier_id: str, manifest: dict | None = None, **files: bytes):
    build = store.new_build_dir(classifier_id)
    if manifest is not None:
        (build / "manifest.json").write_text(json.dumps(manifest))
    for name, data in files.items():
        (build / name).write_bytes(data)
    return build


def _counts_match(store: Store) -> None:
    with store.db.read() as conn:
        actual = {r.status: r.n for r in conn.execute(select(jobs.c.status, func.count().label("n"))
                                                       .group_by(jobs.c.status))}
    assert store.job_counts() == {s: actual.get(s, 0) for s in jobsm.JOB_STATUSES}


def test_create_uses_generated_names_only(store, tmp_path):
    record, job = store.create_classifier("acme", "pets", _samples(), {"method": "r-amt"})
    directory = store.blobs.path(store.blobs.uploads_dir_key(record.classifier_id))
    assert sorted(p.name for p in directory.iterdir()) == ["00000.png", "00001.jpg", "00002.img"]
    assert [label for _, label in store.samples(record.classifier_id)] == ["cat", "dog", "dog"]
    assert record.labels == ["cat", "dog"] and job.status == "queued" and job.tenant == "acme"
    assert not (tmp_path / "etc").exists()
    assert list(store.blobs.tmp.iterdir()) == []  # staging renamed away
    _counts_match(store)


def test_ids_are_checked_before_they_touch_a_path(store):
    for bad in ("../x", "clf_../../etc", "clf_" + "g" * 24, "", "job_" + "0" * 24):
        assert store.get_classifier(bad) is None and store.view(bad) is None
        assert store.model_dir(bad) is None
        assert not store.delete_classifier(bad)
        with pytest.raises(StoreError):
            store.new_build_dir(bad)
    assert store.get_job("../../etc/passwd") is None and store.cancel_job("x; DROP TABLE jobs") is None
    for key in ("../x", "uploads/../../etc", "versions/.hidden", "other/x", "uploads/a/b/c"):
        with pytest.raises(BlobError):
            store.blobs.path(key)


def test_tenants_see_only_their_own(store):
    a, job_a = store.create_classifier("a", "", _samples(), {})
    b, _ = store.create_classifier("b", "", _samples(), {})
    assert store.get_classifier(a.classifier_id, "b") is None and store.get_job(job_a.job_id, "b") is None
    assert store.cancel_job(job_a.job_id, "b") is None and store.get_job(job_a.job_id).status == "queued"
    assert not store.delete_classifier(a.classifier_id, "b")
    assert store.get_classifier(a.classifier_id, "a").classifier_id == a.classifier_id
    page, total, _ = store.list_classifiers("b")
    assert [v.classifier.classifier_id for v in page] == [b.classifier_id] and total == 1
    assert store.count_active_jobs("a") == 1


def test_quota_check_and_create_are_one_step(store):
    """Eight concurrent creates against a quota of three: exactly three get in."""
    results = []

    def create():
        try:
            store.create_classifier("busy", "", _samples(), {}, max_active_jobs=3)
            results.append("ok")
        except QuotaExceeded:
            results.append("quota")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] * 3 + ["quota"] * 5
    assert store.count_active_jobs("busy") == 3 and store.list_classifiers("busy")[1] == 3
    assert len(list((store.blobs.root / "uploads").iterdir())) == 3  # refused creates left no blobs
    store.set_quota("busy", 4)
    store.create_classifier("busy", "", _samples(), {})
    with pytest.raises(QuotaExceeded):
        store.create_classifier("busy", "", _samples(), {})


def test_failed_create_leaves_nothing(store, settings, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("database went away")
    monkeypatch.setattr(jobsm, "insert", broken)
    with pytest.raises(RuntimeError):
        store.create_classifier("t", "", _samples(), {})
    monkeypatch.undo()
    assert count_rows(settings, "classifiers") == 0 and count_rows(settings, "uploads") == 0
    assert list((store.blobs.root / "uploads").iterdir()) == [] and list(store.blobs.tmp.iterdir()) == []


def test_publish_is_all_or_nothing_and_one_per_job(store):
    record, job = store.create_classifier("t", "", _samples(), {})
    cid = record.classifier_id
    assert store.claim(job.job_id, "w1")[0] == "run"
    build = _build(store, cid, None, **{"head.npz": b"half"})
    with pytest.raises(StoreError, match="incomplete"):
        store.publish_version(cid, build, job_id=job.job_id, owner="w1")  # no manifest yet: refused
    assert store.model_dir(cid) is None and store.get_job(job.job_id).status == "running"
    (build / "manifest.json").write_text(json.dumps({"labels": ["cat", "dog"], "candidate": "mask+head"}))
    version = store.publish_version(cid, build, job_id=job.job_id, owner="w1")
    assert version.candidate == "mask+head" and version.files == ["head.npz", "manifest.json"]
    assert store.model_dir(cid) == store.blobs.root / "versions" / version.version_id and not build.exists()
    assert store.get_job(job.job_id).status == "succeeded"
    second = _build(store, cid, {"labels": ["other"]})
    with pytest.raises(StoreError, match="no longer held"):
        store.publish_version(cid, second, job_id=job.job_id, owner="w1")  # the job already published
    assert store.current_version(cid).version_id == version.version_id
    assert sorted(p.name for p in (store.blobs.root / "versions").iterdir()) == [version.version_id]
    assert store.artifact_path(cid, "head.npz").read_bytes() == b"half"
    assert store.artifact_path(cid, "../classifier.json") is None and store.artifact_path(cid, "nope") is None
    _counts_match(store)


def test_preview_then_final(store):
    record, job = store.create_classifier("t", "", _samples(), {})
    cid = record.classifier_id
    store.claim(job.job_id, "w")
    preview = store.publish_version(cid, _build(store, cid, {"labels": []}), final=False, candidate="zero-shot")
    assert store.current_version(cid).version_id == preview.version_id
    view = store.view(cid)
    assert view.version.final is False and view.job.status == "running"
    (store.bases_dir / ("b" * 16)).mkdir()
    final = store.publish_version(cid, _build(store, cid, {"labels": [], "base_id": "b" * 16}),
                                  job_id=job.job_id, owner="w")
    assert store.current_version(cid).version_id == final.version_id and final.base_id == "b" * 16
    late = store.publish_version(cid, _build(store, cid, {"labels": []}), final=False)
    assert store.current_version(cid).version_id == final.version_id  # a preview never replaces a final
    assert late.version_id != final.version_id


def test_the_served_view_follows_every_commit_of_another_process_at_once(store, settings):
    """classify reads its classifier through served_view on every request; on SQLite it answers from the last
    read while nothing was committed, so the test counts the statements it runs."""
    other = Store(settings)  # another process (a worker) writing to the same database
    statements = []
    from sqlalchemy import event

    event.listen(store.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        record, job = other.create_classifier("t", "", _samples(), {})
        cid = record.classifier_id
        first = store.served_view(cid, "t")
        assert first.version is None and first.job.status == "queued"
        assert store.served_view(cid, "other-tenant") is None
        statements.clear()
        again = store.served_view(cid, "t")
        assert again.job.status == "queued" and again.version is None
        if store.db.is_sqlite:
            assert statements == []  # nothing was committed since: no query
        other.claim(job.job_id, "w")
        assert store.served_view(cid, "t").job.status == "running"
        preview = other.publish_version(cid, _build(other, cid, {"labels": []}), final=False, candidate="head")
        assert store.served_view(cid, "t").version.version_id == preview.version_id
        final = other.publish_version(cid, _build(other, cid, {"labels": []}), job_id=job.job_id, owner="w")
        view = store.served_view(cid, "t")
        assert view.version.version_id == final.version_id and view.job.status == "succeeded"
        assert view == store.view(cid, "t")
        assert other.delete_classifier(cid)
        assert store.served_view(cid, "t") is None
    finally:
        other.close()


def test_publish_after_delete_fails_cleanly(store):
    record, job = store.create_classifier("t", "", _samples(), {})
    store.claim(job.job_id, "w")
    build = _build(store, record.classifier_id, {"labels": []})
    assert store.delete_classifier(record.classifier_id)
    assert store.get_job(job.job_id) is None and store.heartbeat(job.job_id, "w") == "deleted"
    with pytest.raises(StoreError, match="no longer exists"):
        store.publish_version(record.classifier_id, build, job_id=job.job_id, owner="w")
    assert list((store.blobs.root / "versions").iterdir()) == []
    assert list((store.blobs.root / "uploads").iterdir()) == []
    assert not store.delete_classifier(record.classifier_id)
    _counts_match(store)


def test_claim_is_a_compare_and_set(store):
    _, job = store.create_classifier("t", "", _samples(), {})
    outcomes = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(store.claim(job.job_id, f"w{i}")))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [rec.lease_owner for outcome, rec in outcomes if outcome == "run"]
    assert len(winners) == 1 and sorted(o for o, _ in outcomes) == ["held"] * 7 + ["run"]
    final = store.get_job(job.job_id)
    assert final.lease_owner == winners[0] and final.attempts == 1
    assert store.heartbeat(job.job_id, "someone-else") == "lease_lost"
    assert store.heartbeat(job.job_id, winners[0]) == "ok"
    assert store.claim("job_" + "0" * 24, "w")[0] == "missing"
    _counts_match(store)


def test_leases_run_on_the_database_clock(store):
    _, job = store.create_classifier("t", "", _samples(), {})
    store.claim(job.job_id, "w")
    running = store.get_job(job.job_id)
    now = store.db.now()
    assert now - 1 < running.started_at <= now
    assert abs(running.lease_expires_at - running.started_at - store.settings.job_lease_seconds) < 1
    assert store.cancel_job(job.job_id).status == "running"  # running: asked, not ended
    assert store.heartbeat(job.job_id, "w") == "cancelled"
    assert store.finish_job(job.job_id, "w", "cancelled") and not store.finish_job(job.job_id, "w", "failed")
    _counts_match(store)


def _expire(store: Store, job_id: str, attempts: int | None = None, owner: str = "gone") -> None:
    values = dict(status="running", lease_owner=owner, lease_expires_at=db_now() - 1)
    if attempts is not None:
        values["attempts"] = attempts
    with store.db.write() as conn:
        old = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
        jobsm._bump(conn, old, "running")


@pytest.mark.parametrize("attempts, cancel, expected", [(1, False, "requeued"), (3, False, "failed"),
                                                         (1, True, "cancelled")])
def test_sweep_recovers_expired_leases_exactly_once(store, attempts, cancel, expected):
    _, job = store.create_classifier("t", "", _samples(), {})
    store.claim(job.job_id, "gone")
    _expire(store, job.job_id, attempts)
    if cancel:
        store.cancel_job(job.job_id)
    sent = []
    counts = store.recover(sent.append)
    assert counts[expected] == 1
    final = store.get_job(job.job_id)
    assert final.lease_owner is None
    assert final.status == {"requeued": "queued", "failed": "failed", "cancelled": "cancelled"}[expected]
    if expected == "failed":
        assert final.error["code"] == "worker_lost" and "attempts" in final.error["message"]
    assert sent == ([job.job_id] if expected == "requeued" else [])
    assert store.recover(sent.append)[expected] == 0  # exactly once
    _counts_match(store)


def test_lost_messages_are_resent_within_a_minute_with_backoff(store):
    assert store.settings.job_resend_seconds <= 60
    _, job = store.create_classifier("t", "", _samples(), {})
    sent = []
    assert store.recover(sent.append)["resent"] == 0  # just created: its message is on its way
    with store.db.write() as conn:  # as if created job_resend_seconds ago and never picked up
        conn.execute(update(jobs).values(resend_at=db_now() - 1))
    assert store.recover(sent.append)["resent"] == 1 and sent == [job.job_id]
    again = store.get_job(job.job_id)
    assert again.sends == 2 and again.resend_at - store.db.now() > store.settings.job_resend_seconds  # backoff
    assert store.recover(sent.append)["resent"] == 0
    assert jobsm.resend_delay(1, 30) == 30 and jobsm.resend_delay(3, 30) == 120 and jobsm.resend_delay(20, 30) == 600


def test_broker_down_during_the_sweep_leaves_the_job_queued(store):
    _, job = store.create_classifier("t", "", _samples(), {})
    store.claim(job.job_id, "gone")
    _expire(store, job.job_id)

    def refuse(_):
        raise ConnectionError("broker down")
    assert store.recover(refuse)["requeued"] == 1
    assert store.get_job(job.job_id).status == "queued"  # re-sent by a later sweep (resend_at)


def test_succeeded_jobs_are_pruned_after_retention(store):
    record, job = store.create_classifier("t", "", _samples(), {})
    store.claim(job.job_id, "w")
    store.publish_version(record.classifier_id, _build(store, record.classifier_id, {"labels": []}),
                          job_id=job.job_id, owner="w")
    _, failed = store.create_classifier("t", "", _samples(), {})
    store.claim(failed.job_id, "w")
    store.finish_job(failed.job_id, "w", "failed", {"code": "x", "message": "y"})
    assert jobsm.prune(store.db, retention_s=3600) == 0
    assert jobsm.prune(store.db, retention_s=-1) == 1  # everything is older than "the future"
    assert store.get_job(job.job_id) is None and store.get_job(failed.job_id).status == "failed"
    view = store.view(record.classifier_id)
    assert view.job is None and view.version is not None  # still ready, still served
    _counts_match(store)


def test_keyset_pages_cover_everything_once(store):
    ids = [store.create_classifier("t", "", _samples(), {}, max_active_jobs=100)[0].classifier_id
           for _ in range(7)]
    seen, cursor = [], None
    while True:
        page, total, cursor = store.list_classifiers("t", limit=3, cursor=cursor)
        seen += [v.classifier.classifier_id for v in page]
        if cursor is None:
            break
    assert seen == ids[::-1] and total == 7
    with pytest.raises(ValueError):
        store.list_classifiers("t", cursor="bm90IGEgY3Vyc29y")


def test_garbage_collection_keeps_what_rows_refer_to(store):
    record, job = store.create_classifier("t", "", _samples(), {})
    cid = record.classifier_id
    store.claim(job.job_id, "w")
    for kind, name in (("versions", "ver_" + "1" * 24), ("uploads", "clf_" + "2" * 24), ("bases", "base1"),
                       ("bases", "base2")):
        (store.blobs.root / kind / name).mkdir()
        (store.blobs.root / kind / name / "f").write_bytes(b"x")
    store.publish_version(cid, _build(store, cid, {"labels": [], "base_id": "base1"}), job_id=job.job_id, owner="w")
    removed = store.collect_garbage(grace_s=0, base_grace_s=0)
    assert removed["versions"] == 1 and removed["uploads"] == 1 and removed["bases"] == 1
    assert (store.blobs.root / "bases" / "base1").is_dir() and not (store.blobs.root / "bases" / "base2").exists()
    assert store.model_dir(cid).is_dir() and all(p.is_file() for p, _ in store.samples(cid))
    assert store.collect_garbage(grace_s=3600)["versions"] == 0


def test_stale_staging_is_cleaned_up(store):
    """Staging another host made (its process cannot be checked from here) goes an hour after its last write."""
    import os

    old, fresh = store.blobs.tmp / "put-1@elsewhere.7.99", store.blobs.tmp / "put-2@elsewhere.7.99"
    for path in (old, fresh):
        path.mkdir()
        (path / "part").write_bytes(b"x")
    os.utime(old / "part", (1, 1))
    os.utime(old, (1, 1))
    assert store.blobs.cleanup_tmp(3600) == 1 and not old.exists() and fresh.exists()
    store.check_ready()


def test_concurrent_migrations_run_once(database_url, tmp_path, settings):
    """Replicas starting together: every one returns at head, the schema is created once."""
    url = settings.effective_database_url
    errors, threads = [], []
    for _ in range(4):
        def run():
            try:
                upgrade_database(url)
            except Exception as exc:  # pragma: no cover - the assertion below shows it
                errors.append(exc)
        threads.append(threading.Thread(target=run))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(url)
    try:
        assert current_revision(db) == head_revision()
        with db.read() as conn:
            assert sorted(r.status for r in conn.execute(select(job_counts.c.status))) == sorted(jobsm.JOB_STATUSES)
    finally:
        db.dispose()


def test_a_sqlite_migrator_waits_for_another_longer_than_a_request_would(tmp_path):
    """Replicas on a loaded machine queue behind one migration for longer than the engine's lock timeout
    (meant for requests, which should fail fast): a migrator must wait for its turn, not fail with
    'database is locked' (seen once in CI with 4 replicas and the 5 s default)."""
    import sqlite3

    path = tmp_path / "records.sqlite"
    url = f"sqlite:///{path}"
    db = Database(url, lock_timeout_s=0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")  # another process is migrating
    errors, done = [], threading.Event()

    def run():
        try:
            upgrade_database(db)
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert not done.wait(0.5)  # ten times the lock timeout: still waiting, not failed
        holder.execute("COMMIT")
        thread.join()
        assert errors == []
        assert current_revision(db) == head_revision()
        with db.engine.connect() as conn:  # the pooled connection is back to the request timeout
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 50
    finally:
        holder.close()
        db.dispose()


def test_a_tenant_quota_overrides_the_default(store):
    assert store.quota_state("vip") == (0, store.settings.max_queued_jobs)
    store.set_quota("vip", store.settings.max_queued_jobs + 2)
    for _ in range(store.settings.max_queued_jobs + 2):
        store.create_classifier("vip", "", _samples(), {})
    assert store.quota_state("vip") == (store.settings.max_queued_jobs + 2,) * 2
    with pytest.raises(QuotaExceeded):
        store.create_classifier("vip", "", _samples(), {})


def test_a_new_files_wal_switch_is_retried_while_another_connection_makes_it():
    """SQLite answers "database is locked" at once, without its busy handler, to a connection that asks for WAL
    while another one is switching the new file: use_wal retries that (the switch is idempotent) until the lock
    timeout; any other error, and a lock held past the timeout, still raise."""
    import sqlite3

    from rmt_service.db import use_wal

    class Cursor:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def execute(self, sql):
            assert sql == "PRAGMA journal_mode=WAL"
            self.calls += 1
            answer = self.answers.pop(0) if self.answers else None
            if answer:
                raise sqlite3.OperationalError(answer)

    cursor = Cursor(["database is locked", "database is locked"])
    use_wal(cursor, timeout_s=5.0)
    assert cursor.calls == 3
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        use_wal(Cursor(["disk I/O error"]), timeout_s=5.0)
    stuck = Cursor(["database is locked"] * 1000)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(stuck, timeout_s=0.05)
    assert 1 < stuck.calls < 1000
