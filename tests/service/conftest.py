"""Fixtures for the service tests: isolated settings, an app over a temp data dir, a tuned classifier."""
from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_service.settings import Settings
from rmt_core.store import ClassifierStore
from tests.service.helpers import FakeQueue, make_settings, upload_parts
from worker.tasks import run_tune_job


@pytest.fixture(autouse=True)
def _no_developer_env(monkeypatch, tmp_path):
    """Settings read RMT_* and ./.env: tests must not pick up a developer's configuration."""
    for key in list(os.environ):
        if key.startswith("RMT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def client(settings, queue):
    with TestClient(create_app(settings, queue=queue)) as c:
        yield c


@pytest.fixture
def store(settings) -> ClassifierStore:
    return ClassifierStore(settings.data_dir)


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    """One classifier created over HTTP and tuned in-process (real pipeline, tiny backbone), shared read-only."""
    settings = make_settings(tmp_path_factory.mktemp("tuned") / "data")
    queue = FakeQueue()
    with TestClient(create_app(settings, queue=queue)) as c:
        files, data = upload_parts(per_class=5)
        created = c.post("/v1/classifiers", files=files, data=data).json()
    outcome = run_tune_job(ClassifierStore(settings.data_dir), settings, created["job_id"])
    assert outcome == "succeeded"
    return {"settings": settings, **created}


@pytest.fixture
def tuned_client(tuned):
    """A fresh app (empty cache) over the tuned classifier's data directory."""
    with TestClient(create_app(tuned["settings"], queue=FakeQueue())) as c:
        yield c
