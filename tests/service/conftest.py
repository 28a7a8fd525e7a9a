"""Fixtures for the service tests: isolated settings over SQLite and PostgreSQL, an app, a tuned classifier.

Every test that takes ``settings`` (or ``client``/``store``) runs twice: on SQLite in its data dir and on
PostgreSQL (a schema of its own in a throwaway database). Where PostgreSQL cannot be reached or started,
that leg is skipped with the reason, which pytest's ``-ra`` prints in the summary.
"""
from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rmt_service.migrate import prepare
from rmt_service.settings import Settings
from rmt_service.store import Store
from tests.service.helpers import FakeQueue, make_settings, upload_parts
from tests.service.pg import Postgres
from worker.tasks import run_tune_job

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def _no_developer_env(monkeypatch, tmp_path):
    """Settings read RMT_* and ./.env: tests must not pick up a developer's configuration."""
    for key in list(os.environ):
        if key.startswith("RMT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    server = Postgres(tmp_path_factory.mktemp("pg")).start()
    yield server
    server.stop()


def _database_url(backend: str, postgres: Postgres) -> str:
    if backend == "sqlite":
        return ""
    if postgres.skip_reason:
        pytest.skip(postgres.skip_reason)
    return postgres.new_schema()


@pytest.fixture(params=BACKENDS)
def database_url(request, postgres) -> str:
    return _database_url(request.param, postgres)


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return make_settings(tmp_path / "data", database_url=database_url)


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def client(settings, queue):
    with TestClient(create_app(settings, queue=queue)) as c:
        yield c


@pytest.fixture
def store(settings):
    prepare(settings)
    s = Store(settings)
    yield s
    s.close()


@pytest.fixture(scope="session", params=BACKENDS)
def tuned(request, tmp_path_factory, postgres):
    """One classifier created over HTTP and tuned in-process (real pipeline, tiny backbone), shared read-only."""
    settings = make_settings(tmp_path_factory.mktemp("tuned") / "data",
                             database_url=_database_url(request.param, postgres))
    queue = FakeQueue()
    with TestClient(create_app(settings, queue=queue)) as c:
        files, data = upload_parts(per_class=5)
        created = c.post("/v1/classifiers", files=files, data=data).json()
    store = Store(settings)
    try:
        outcome = run_tune_job(store, settings, created["job_id"])
    finally:
        store.close()
    assert outcome == "succeeded"
    return {"settings": settings, **created}


@pytest.fixture
def tuned_client(tuned):
    """A fresh app (empty cache) over the tuned classifier's data directory."""
    with TestClient(create_app(tuned["settings"], queue=FakeQueue())) as c:
        yield c
