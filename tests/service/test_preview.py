"""Instant preview, the honest schedule, calibrated "unknown" and job warnings, through the HTTP API.

A real (tiny) worker run goes on in a thread; the only thing the test adds is a gate in front of mask
tuning, so it can look at the service while the previews are published and tuning has not finished.
"""
from __future__ import annotations

import json
import threading

import pytest

import rmt_core.tuning as tuning
from rmt_service.store import Store
from tests.service.helpers import TINY_CONFIG, image_bytes, pretty, upload_parts, wait_for
from worker.tasks import run_tune_job


class Gate:
    """Wraps rmt_core.tuning.tune: waits until the test opens it, then tunes (or raises ``fault``)."""

    def __init__(self, monkeypatch):
        self.reached, self.open = threading.Event(), threading.Event()
        self.fault: Exception | None = None
        real = tuning.tune

        def gated(*args, **kwargs):
            self.reached.set()
            assert self.open.wait(60), "the test never opened the gate"
            if self.fault is not None:
                raise self.fault
            return real(*args, **kwargs)

        monkeypatch.setattr(tuning, "tune", gated)


def _create(client, per_class=3, **config):
    files, data = upload_parts(per_class=per_class)
    data["config"] = json.dumps({**TINY_CONFIG, **config})
    r = client.post("/v1/classifiers", files=files, data=data)
    assert r.status_code == 202, pretty(r)
    return r.json()


def _start_worker(settings, job_id):
    out: dict = {}

    def work():
        store = Store(settings)
        try:
            out["outcome"] = run_tune_job(store, settings, job_id)
        finally:
            store.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, out


def _classify(client, classifier_id, **params):
    return client.post(f"/v1/classifiers/{classifier_id}/classify", params=params,
                       files={"file": ("x.png", image_bytes((220, 30, 30), seed=7), "image/png")})


def test_create_reports_the_schedule_and_answers_409_until_a_preview(client):
    created = _create(client)
    schedule = created["schedule"]
    # 6 images, no holdout (classes < 5 images), batch 8: 1 step per epoch; min_steps=2 raises 1 epoch to 2
    assert schedule["n_train"] == 6 and schedule["n_holdout"] == 0 and schedule["steps_per_epoch"] == 1
    assert (schedule["epochs_requested"], schedule["epochs"], schedule["total_steps"]) == (1, 2, 2)
    assert schedule["raised_by_min_steps"] and "min_steps=2" in schedule["warning"]
    job = client.get(f"/v1/jobs/{created['job_id']}").json()
    assert job["schedule"] == schedule and job["preview"] is None and job["progress"] is None
    assert job["warnings"] == [schedule["warning"]]
    r = _classify(client, created["classifier_id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready", pretty(r)
    assert r.headers["Retry-After"] and "preview" in r.json()["error"]["message"]
    view = client.get(f"/v1/classifiers/{created['classifier_id']}").json()
    assert view["status"] == "queued" and view["final"] is None and view["schedule"] == schedule


def test_preview_answers_while_tuning_then_the_published_model(client, settings, monkeypatch):
    gate = Gate(monkeypatch)
    created = _create(client, per_class=5, unknown=True)  # 5 per class: a holdout to choose min_score on
    cid, job_id = created["classifier_id"], created["job_id"]
    thread, out = _start_worker(settings, job_id)
    try:
        assert gate.reached.wait(60), "tuning never started"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "running" and job["preview"]["model"] in ("zero-shot", "head"), job
        r = _classify(client, cid)
        assert r.status_code == 200, pretty(r)
        preview = r.json()
        assert preview["final"] is False and preview["model"] == job["preview"]["model"]
        assert preview["label"] == preview["predictions"][0]["label"] and preview["unknown"] is False
        assert preview["results"][0]["filename"] == "x.png"
        view = client.get(f"/v1/classifiers/{cid}").json()
        assert view["status"] == "running" and view["final"] is False
        assert view["preview"]["model"] == preview["model"]
        model = client.get(f"/v1/classifiers/{cid}/artifacts/manifest.json").json()
        assert model["candidate"] == preview["model"] and model["mask_file"] is None and model["preview"] is True
    finally:
        gate.open.set()
        thread.join(120)
    assert out["outcome"] == "succeeded"
    r = _classify(client, cid)
    assert r.status_code == 200, pretty(r)
    final = r.json()
    assert final["final"] is True and final["model"] == "mask"  # the pinned candidate (TINY_CONFIG select=mask)
    view = client.get(f"/v1/classifiers/{cid}").json()
    assert view["status"] == "ready" and view["final"] is True and view["validation"]["published"] == "mask"
    # the classifier's own default threshold is used (config.unknown), and reported
    assert final["min_score"] is not None and final["min_score"] == view["validation"]["min_score"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["schedule"]["n_holdout"] == 2 and job["schedule"]["total_steps"] == 2
    assert any("min_steps" in w for w in job["warnings"]), job["warnings"]
    assert set(view["validation"]["warnings"]) <= set(job["warnings"])


def test_min_score_makes_the_answer_unknown(tuned_client, tuned):
    cid = tuned["classifier_id"]
    r = _classify(tuned_client, cid, min_score=1.0)
    assert r.status_code == 200, pretty(r)
    body = r.json()
    assert body["unknown"] is True and body["label"] is None and body["min_score"] == 1.0
    assert body["results"][0]["unknown"] is True and body["results"][0]["label"] is None
    assert len(body["predictions"]) == 2  # the top-k is still listed
    body = _classify(tuned_client, cid, min_score=0.0).json()
    assert body["unknown"] is False and body["label"] == body["predictions"][0]["label"]
    body = _classify(tuned_client, cid).json()  # built without config.unknown: no default threshold
    assert body["min_score"] is None and body["unknown"] is False and body["final"] is True
    r = _classify(tuned_client, cid, min_score=1.5)
    assert r.status_code == 422, pretty(r)


def test_every_answer_has_an_outlier_score_and_max_outlier_overrides(tuned_client, tuned):
    cid = tuned["classifier_id"]
    body = _classify(tuned_client, cid).json()
    far = body["results"][0]["outlier_score"]
    assert 0 < far <= 1 and body["max_outlier"] is None and body["unknown"] is False  # no threshold by default
    body = _classify(tuned_client, cid, max_outlier=far / 2).json()  # the image is farther than allowed
    assert body["unknown"] is True and body["label"] is None and body["max_outlier"] == far / 2
    assert body["results"][0]["outlier_score"] == far and len(body["predictions"]) == 2
    body = _classify(tuned_client, cid, max_outlier=1.0, min_score=0.0).json()
    assert body["unknown"] is False and body["label"] == body["predictions"][0]["label"]
    assert _classify(tuned_client, cid, max_outlier=-0.1).status_code == 422
    # a batch: one outlier score per image, and an undecodable image is named by its file name
    files = [("files", ("a.png", image_bytes((30, 200, 40)), "image/png")),
             ("files", ("broken.png", image_bytes()[:60], "image/png")),
             ("files", ("also-broken.png", b"not an image", "image/png"))]
    r = tuned_client.post(f"/v1/classifiers/{cid}/classify", files=files)
    assert r.status_code == 415, pretty(r)
    message = r.json()["error"]["message"]
    assert "files[1] (broken.png)" in message and "files[2] (also-broken.png)" in message and "a.png" not in message


def test_thresholds_come_from_the_request_then_the_config_then_the_built_default():
    from app.routers.classify import _threshold

    manifest = {"min_score": 0.3, "max_outlier": 0.6}
    assert _threshold("max_outlier", None, {"unknown": True}, manifest) == 0.6  # the default chosen on the images
    assert _threshold("max_outlier", None, {"unknown": False}, manifest) is None  # not asked for unknown answers
    assert _threshold("max_outlier", None, {"unknown": True, "max_outlier": 0.9}, manifest) == 0.9  # config wins
    assert _threshold("max_outlier", 0.1, {"unknown": True, "max_outlier": 0.9}, manifest) == 0.1  # request wins
    assert _threshold("min_score", None, {"min_score": 0.5}, {}) == 0.5  # config alone, without unknown
    assert _threshold("min_score", None, {"unknown": True}, {"validation": {"min_score": 0.2}}) == 0.2  # old manifest


@pytest.mark.parametrize("end, keep_preview", [("cancelled", False), ("failed", True)])
def test_after_a_failed_or_cancelled_job_the_preview_answers_only_if_kept(client, settings, monkeypatch,
                                                                         end, keep_preview):
    gate = Gate(monkeypatch)
    created = _create(client, keep_preview=keep_preview)
    cid, job_id = created["classifier_id"], created["job_id"]
    thread, out = _start_worker(settings, job_id)
    try:
        assert gate.reached.wait(60), "tuning never started"
        assert _classify(client, cid).json()["final"] is False
        if end == "cancelled":
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
            wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["cancel_requested"], 10, what="cancel")
        else:
            gate.fault = RuntimeError("injected fault")
    finally:
        gate.open.set()
        thread.join(120)
    assert out["outcome"] == end
    r = _classify(client, cid)
    view = client.get(f"/v1/classifiers/{cid}").json()
    assert view["status"] == end, view
    if keep_preview:
        assert r.status_code == 200 and r.json()["final"] is False, pretty(r)
        assert view["final"] is False and view["preview"]["model"] == r.json()["model"]
    else:
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready", pretty(r)
        assert view["final"] is None and view["preview"] is None and view["artifacts"] is None
        assert "keep_preview" in r.json()["error"]["message"]


def test_the_api_imports_what_the_first_classifier_load_needs_at_start(tmp_path):
    """On a fresh install the first classify after a create used to import ``onnx`` inside the request (most of
    its first load); the app imports it when it starts. Checked in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from app.main import create_app; from tests.service.helpers import make_settings; "
            "before = 'onnx' in sys.modules; "
            f"create_app(make_settings({str(tmp_path / 'data')!r})); "
            "print(before, 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]


def _base_rows(store):
    from sqlalchemy import select

    from rmt_service.db import bases

    with store.db.read() as conn:
        return [tuple(r) for r in conn.execute(select(bases.c.base_id, bases.c.backbone, bases.c.pretrained))]


def test_the_worker_prepares_the_default_base_and_a_create_then_does_not_export_it(client, settings, monkeypatch):
    """On a fresh data directory the first create's preview waited for the default backbone's base export; a
    worker now exports and records it when it starts (worker.tasks.prepare_default_base, run after the preload).
    Idempotent, kept by collection while young, and the create that follows tunes on it without exporting."""
    import rmt_core.base as base_module
    from worker.tasks import prepare_default_base

    exports: list[str] = []
    real_export = base_module._export

    def counted(backbone, base_id, out, opset):
        exports.append(base_id)
        return real_export(backbone, base_id, out, opset)

    monkeypatch.setattr(base_module, "_export", counted)
    store = Store(settings)
    try:
        assert prepare_default_base(store, settings.model_copy(update={"prepare_default_base": False})) is None
        assert exports == [] and _base_rows(store) == []

        base_id = prepare_default_base(store, settings)
        assert exports == [base_id]
        assert (store.bases_dir / base_id / "base.json").is_file()
        assert _base_rows(store) == [(base_id, settings.default_backbone, settings.default_pretrained)]
        assert not [p.name for p in store.blobs.tmp.iterdir() if p.name.startswith("base-")]  # staging renamed away

        assert prepare_default_base(store, settings) == base_id  # a second worker start: found, not exported
        assert exports == [base_id] and len(_base_rows(store)) == 1
        assert store.collect_garbage(grace_s=0)["bases"] == 0  # unused but young: kept (base grace)
    finally:
        store.close()

    created = _create(client, per_class=3, backbone=settings.default_backbone, pretrained=settings.default_pretrained)
    thread, out = _start_worker(settings, created["job_id"])
    thread.join(180)
    assert out.get("outcome") == "succeeded", out
    assert exports == [base_id]  # the job found the base: no second export
    manifest = client.get(f"/v1/classifiers/{created['classifier_id']}/artifacts/manifest.json").json()
    assert manifest["base_id"] == base_id


def test_a_fresh_worker_exports_the_default_base_before_any_create(tmp_path):
    """The wiring: a real `rmt worker` started on an empty data directory (embedded broker) records the default
    base with no create sent; a second start finds it."""
    from rmt_service.migrate import prepare
    from tests.service.helpers import make_settings
    from tests.service.procs import start_worker

    settings = make_settings(tmp_path / "data")
    prepare(settings)
    store = Store(settings)
    try:
        for start, said in enumerate(("exported", "already stored")):
            worker = start_worker(settings.data_dir, "", tmp_path / f"worker{start}.log")
            try:
                worker.wait_log(f"pretrained builtin) {said} in", 180)
                rows = _base_rows(store)
                assert len(rows) == 1 and rows[0][1:] == (settings.default_backbone, settings.default_pretrained)
                assert (store.bases_dir / rows[0][0] / "base.json").is_file()
            finally:
                worker.stop()
        assert len(list(store.bases_dir.iterdir())) == 1
    finally:
        store.close()
