"""Two API processes and two workers on one PostgreSQL (and one Redis): concurrent creates, deletes and
cancels; a worker frozen (SIGSTOP) past its lease and one killed (SIGKILL) mid-job. Afterwards no job is
lost or duplicated, every classifier that should be ready is, and each was published exactly once.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from rmt_service import jobs as jobsm
from rmt_service.db import jobs, versions
from rmt_service.store import Store
from tests.service.helpers import TINY_CONFIG, free_port, make_settings, service_env, upload_parts, wait_for
from tests.service.procs import Child, RedisServer, rmt

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE_S = "3"


def _env(database_url: str, broker_url: str) -> dict[str, str]:
    return service_env(RMT_DATABASE_URL=database_url, RMT_BROKER_URL=broker_url, RMT_JOB_LEASE_SECONDS=LEASE_S,
                       RMT_DEVICE="cpu", RMT_MAX_QUEUED_JOBS="50", RMT_ALLOW_INSECURE_BIND="1",
                       RMT_JOB_RESEND_SECONDS="5")


def _worker(data_dir, env, log) -> Child:
    return Child(rmt("worker", "--data-dir", str(data_dir), "--loglevel", "info"), env, log)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _owner_group(store: Store, job_id: str) -> int | None:
    """The process group (= the worker Child's pid) of the process holding the job's lease, if running."""
    job = store.get_job(job_id)
    if job is None or job.status != "running" or not job.lease_owner:
        return None
    try:
        return os.getpgid(int(job.lease_owner.split(":")[1]))
    except (ProcessLookupError, ValueError, IndexError):
        return None


def test_two_apis_two_workers_one_postgres(tmp_path, postgres):
    if postgres.skip_reason:
        pytest.skip(postgres.skip_reason)
    database_url = postgres.new_schema()
    redis_server = RedisServer(tmp_path).start()
    data_dir = tmp_path / "data"
    env = _env(database_url, redis_server.url)
    ports = [free_port(), free_port()]
    apis = [Child(rmt("serve", "--port", str(p), "--data-dir", str(data_dir), "--worker", "no"), env,
                  tmp_path / f"api{i}.log") for i, p in enumerate(ports)]  # both migrate at start: one wins
    workers = [_worker(data_dir, env, tmp_path / f"w{i}.log") for i in range(2)]
    store = Store(make_settings(data_dir, database_url=database_url))
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    children = apis + workers
    try:
        for base in bases:
            wait_for(lambda: _up(base), 90, what=f"{base} ready")
        for w in workers:
            w.wait_log(" ready.", 90)

        # Concurrent creates through both APIs; then, concurrently, deletes and cancels of some of them.
        def create(i: int) -> dict:
            files, data = upload_parts(per_class=3)
            data["config"] = json.dumps({**TINY_CONFIG, "min_steps": 30})
            r = httpx.post(f"{bases[i % 2]}/v1/classifiers", files=files, data=data, timeout=60)
            assert r.status_code == 202, r.text
            return r.json()

        with ThreadPoolExecutor(6) as pool:
            created = list(pool.map(create, range(6)))
        doomed, cancelled = created[4], created[5]
        with ThreadPoolExecutor(4) as pool:
            deleted = pool.submit(httpx.delete, f"{bases[0]}/v1/classifiers/{doomed['classifier_id']}", timeout=30)
            cancel = pool.submit(httpx.delete, f"{bases[1]}/v1/jobs/{cancelled['job_id']}", timeout=30)
            assert deleted.result().status_code == 204 and cancel.result().status_code in (200, 202)
        keep = created[:4]

        # Freeze the worker running some job past its lease; the other worker must take the job over.
        def running_on(group_pids: set[int]):
            for c in keep:
                group = _owner_group(store, c["job_id"])
                if group in group_pids:
                    return c, group
            return None

        frozen_job, frozen_group = wait_for(lambda: running_on({w.pid for w in workers}), 120,
                                            interval=0.1, what="a job running on a worker")
        os.killpg(frozen_group, signal.SIGSTOP)
        frozen = next(w for w in workers if w.pid == frozen_group)
        other = next(w for w in workers if w is not frozen)
        wait_for(lambda: _owner_group(store, frozen_job["job_id"]) == other.pid
                 or store.get_job(frozen_job["job_id"]).status == "succeeded", 120, interval=0.2,
                 what="the frozen worker's job to be taken over")
        os.killpg(frozen_group, signal.SIGCONT)  # it wakes up without its lease: it must not publish

        # Kill the other worker mid-job; start a third one; everything must still finish.
        victim = wait_for(lambda: running_on({other.pid}), 120, interval=0.1, what="a job on the second worker")
        other.kill_group()
        killed_at = time.time()
        workers.append(_worker(data_dir, env, tmp_path / "w2.log"))
        children.append(workers[-1])

        def all_done():
            states = [store.get_job(c["job_id"]).status for c in keep]
            return states if all(s in jobsm.TERMINAL_STATUSES for s in states) else None

        states = wait_for(all_done, 300, interval=0.5, what="every job to finish")
        assert states == ["succeeded"] * 4, (states, [w.log() for w in workers])
        assert victim is not None and store.get_job(victim[0]["job_id"]).attempts >= 2
        assert store.get_job(frozen_job["job_id"]).attempts >= 2

        with store.db.read() as conn:
            per_classifier = dict(conn.execute(select(versions.c.classifier_id, func.count())
                                               .where(versions.c.final).group_by(versions.c.classifier_id)).all())
            n_versions = conn.execute(select(func.count()).select_from(versions)).scalar_one()  # with previews
            statuses = dict(conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all())
        assert per_classifier == {c["classifier_id"]: 1 for c in keep}  # one final publish each
        assert statuses == {"succeeded": 4, "cancelled": 1}  # the deleted one has no job left; none lost
        assert store.job_counts() == {**dict.fromkeys(jobsm.JOB_STATUSES, 0), **statuses}
        time.sleep(1.5)  # the woken worker's refused attempt has ended by now; nothing changed
        # Refused publishes left no blob: one per version row (the finals and each attempt's previews). The one
        # exception is the SIGKILLed worker's: killed between writing a preview's blob and inserting its row, it
        # can leave that blob (at most one, written before the kill), which no row owns and collection removes.
        with store.db.read() as conn:
            rows = set(conn.execute(select(versions.c.version_id)).scalars().all())
        on_disk = {p.name for p in (data_dir / "blobs" / "versions").iterdir()}
        assert len(rows) == n_versions and rows <= on_disk
        orphans = on_disk - rows
        assert len(orphans) <= 1, orphans
        for name in orphans:
            manifest = json.loads((data_dir / "blobs" / "versions" / name / "manifest.json").read_text())
            assert manifest.get("preview") and dt.datetime.fromisoformat(manifest["created_at"]).timestamp() <= killed_at
        store.collect_garbage(grace_s=0)
        assert {p.name for p in (data_dir / "blobs" / "versions").iterdir()} == rows
        assert store.get_job(frozen_job["job_id"]).status == "succeeded"
        for c in keep:
            r = httpx.get(f"{bases[1]}/v1/classifiers/{c['classifier_id']}", timeout=10).json()
            assert r["status"] == "ready", r
        assert httpx.get(f"{bases[0]}/v1/classifiers/{doomed['classifier_id']}", timeout=10).status_code == 404
        listing = httpx.get(f"{bases[0]}/v1/classifiers", params={"limit": 2}, timeout=10).json()
        assert listing["total"] == 5 and listing["next_cursor"]
    finally:
        for child in children:
            try:
                os.killpg(child.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            child.stop(timeout=15)
        store.close()
        redis_server.stop()
