"""Records-database benchmark: create / status / list / metrics latency over HTTP and the recovery sweep, at
10, 1,000 and 100,000 stored jobs, on SQLite and (when it answers) PostgreSQL.

    .venv/bin/python bench/bench_store.py [--sizes 10 1000 100000] [--repeat 40] [--out bench/RESULTS-store.md]

The big counts are inserted in bulk straight into the tables (classifiers, uploads, jobs, versions, with the
counters the service keeps), all in ONE tenant — the worst case for a listing — with a realistic mix: most
jobs succeeded, some failed or cancelled, a few running (live leases) and a few with expired leases. Then
the real API (in-process, FastAPI TestClient; the broker is a recorder) answers:
  create  POST /v1/classifiers (2 small PNGs: decode, blobs, quota check + insert transaction)
  status  GET /v1/jobs/{id} of a random stored job
  list    GET /v1/classifiers?limit=50 (first page) and the page after a cursor half-way down
  metrics GET /metrics
  store_status, store_list   the same reads through the store, without the HTTP stack
  sweep   one recovery sweep (expired leases, lost messages, retention) as every worker runs it; at 100,000
          jobs (spread over 11 days) it also deletes a 1,000-job batch of succeeded jobs past the 7-day
          retention; sweep_idle is the same sweep with nothing to prune
Goal (issue 8): flat — within 2x from 10 to 100,000 — and the sweep <= 1 s at 100,000.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy import update  # noqa: E402

from app.main import create_app  # noqa: E402
from rmt_service import jobs as jobsm  # noqa: E402
from rmt_service.db import classifiers, jobs, tenants, uploads, versions  # noqa: E402
from rmt_service.migrate import prepare  # noqa: E402
from rmt_service.settings import Settings  # noqa: E402
from rmt_service.store import Store  # noqa: E402

TENANT = "default"  # the tenant of an API with no keys


class Recorder:
    def enqueue(self, job_id: str) -> None:
        pass

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (24, 24), (seed % 255, 40, 90))
    img.save(buf, "PNG")
    return buf.getvalue()


def bulk_insert(store: Store, n: int, now: float) -> list[str]:
    """n classifiers with a job each (and a version for the succeeded ones); returns the job ids.

    The active jobs are a fixed handful whatever n (they are bounded by workers and quotas, not by history)."""
    rng = random.Random(n)
    job_ids = []
    chunk = 5000
    for start in range(0, n, chunk):
        rows_c, rows_u, rows_j, rows_v = [], [], [], []
        for i in range(start, min(n, start + chunk)):
            cid, jid, vid = "clf_" + secrets.token_hex(12), "job_" + secrets.token_hex(12), "ver_" + secrets.token_hex(12)
            created = now - (n - i) * 10.0
            r = rng.random()
            status = "succeeded" if r < 0.9 else "failed" if r < 0.95 else "cancelled"
            lease = None
            if i >= n - 5:  # the newest: five running with live leases, three whose workers died
                status, lease = "running", now + 3600
            elif i >= n - 8:
                status, lease = "running", now - 60
            rows_c.append({"id": cid, "tenant": TENANT, "name": f"bench-{i}", "labels": ["a", "b"],
                           "config": {"method": "r-amt"}, "n_images": 2, "created_at": created, "job_id": jid,
                           "current_version_id": vid if status == "succeeded" else None})
            rows_u += [{"classifier_id": cid, "idx": k, "blob_key": f"uploads/{cid}/{k:05d}.png", "label": "ab"[k],
                        "original_name": ""} for k in range(2)]
            rows_j.append({"id": jid, "classifier_id": cid, "tenant": TENANT, "status": status,
                           "progress": {"step": 10, "total_steps": 10}, "warnings": None, "error": None,
                           "attempts": 1, "sends": 1, "resend_at": created + 30,
                           "lease_owner": "bench:1:x" if lease else None, "lease_expires_at": lease,
                           "cancel_requested": False, "created_at": created, "enqueued_at": created,
                           "started_at": created + 1, "finished_at": None if lease else created + 60,
                           "updated_at": created + 60})
            if status == "succeeded":
                rows_v.append({"version_id": vid, "classifier_id": cid, "candidate": "mask+head", "final": True,
                               "blob_key": f"versions/{vid}", "base_id": None,
                               "manifest": {"labels": ["a", "b"], "sparsity": 1.0}, "files": ["manifest.json"],
                               "created_at": created + 60})
            job_ids.append(jid)
        with store.db.write() as conn:
            conn.execute(classifiers.insert(), rows_c)
            conn.execute(uploads.insert(), rows_u)
            conn.execute(jobs.insert(), rows_j)
            if rows_v:
                conn.execute(versions.insert(), rows_v)
    with store.db.write() as conn:
        if conn.execute(tenants.select().where(tenants.c.tenant == TENANT)).first() is None:
            conn.execute(tenants.insert().values(tenant=TENANT, n_classifiers=0, created_at=now,
                                                 max_active_jobs=10**9))
        conn.execute(update(tenants).where(tenants.c.tenant == TENANT)
                     .values(n_classifiers=tenants.c.n_classifiers + n, max_active_jobs=10**9))
        jobsm.recount(conn)
    if store.db.dialect == "postgresql":
        with store.db.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    else:
        with store.db.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    return job_ids


class Setup:
    """One database with ``n`` stored jobs and an app over it (kept open while all sizes are measured)."""

    def __init__(self, backend: str, n: int, pg_url: str | None):
        self.backend, self.n, self.pg_url = backend, n, pg_url
        self.work = Path(tempfile.mkdtemp(prefix=f"bench-store-{backend}-{n}-"))
        self.schema = None
        database_url = ""
        if backend == "postgresql":
            import psycopg

            self.schema = "bench_" + secrets.token_hex(4)
            with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
            database_url = f"{pg_url}?options=-csearch_path%3D{self.schema}"
        self.settings = Settings(_env_file=None, data_dir=self.work / "data", database_url=database_url,
                                 api_keys="", broker_url="", max_queued_jobs=10**6)
        prepare(self.settings)
        self.store = Store(self.settings)
        t = time.perf_counter()
        self.job_ids = bulk_insert(self.store, n, self.store.db.now())
        self.load_s = time.perf_counter() - t
        self._client = TestClient(create_app(self.settings, queue=Recorder()))
        self.client = self._client.__enter__()
        self.cursor: str | None = None
        self.rng = random.Random(0)
        files = [("files", ("a.png", png(1), "image/png")), ("files", ("b.png", png(2), "image/png"))]
        data = {"labels": ["a", "b"], "config": json.dumps({"backbone": "rmt-tiny-vit", "pretrained": None})}
        self.ops = {
            "create": lambda: self._ok(self.client.post("/v1/classifiers", files=files, data=data), 202),
            "status": lambda: self._ok(self.client.get(f"/v1/jobs/{self.rng.choice(self.job_ids)}")),
            "list": lambda: self._ok(self.client.get("/v1/classifiers", params={"limit": 50})),
            "list_cursor": lambda: self._ok(self.client.get(
                "/v1/classifiers", params={"limit": 50, "cursor": self._cursor()})),
            "metrics": lambda: self._ok(self.client.get("/metrics")),
            # the same reads at the store, without the HTTP stack (what the database itself costs)
            "store_status": lambda: self.store.get_job(self.rng.choice(self.job_ids)),
            "store_list": lambda: self.store.list_classifiers(TENANT, 50),
            "sweep": lambda: self.store.recover(lambda job_id: None),  # with a retention backlog at 100,000
            "sweep_idle": self._idle_sweep,
        }

    def _cursor(self) -> str:
        """A cursor half-way down the listing (taken once, after the creates), with a full page after it."""
        if self.cursor is None:
            total = self.client.get("/v1/classifiers", params={"limit": 1}).json()["total"]
            page = self.client.get("/v1/classifiers", params={"limit": min(500, max(1, (total - 50) // 2))}).json()
            self.cursor = page["next_cursor"]
        return self.cursor

    def _idle_sweep(self) -> None:
        settings = self.store.settings
        self.store.settings = settings.model_copy(update={"job_retention_seconds": 1e12})
        try:
            self.store.recover(lambda job_id: None)
        finally:
            self.store.settings = settings

    @staticmethod
    def _ok(response, status: int = 200) -> None:
        assert response.status_code == status, response.text

    def close(self) -> None:
        self._client.__exit__(None, None, None)
        self.store.close()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.schema:
            import psycopg

            with psycopg.connect(self.pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {self.schema} CASCADE")


def measure(backend: str, sizes: list[int], repeat: int, pg_url: str | None) -> dict[int, dict[str, float]]:
    """Median seconds per operation and size. Sizes are interleaved call by call, so the load of a shared
    machine falls on every size alike and the ratios stay meaningful."""
    setups = [Setup(backend, n, pg_url) for n in sizes]
    try:
        out = {s.n: {"load_s": s.load_s} for s in setups}
        for op in setups[0].ops:
            samples: dict[int, list[float]] = {s.n: [] for s in setups}
            rounds = 5 if op.startswith("sweep") else repeat
            for s in setups:
                s.ops[op]()  # warm-up
            for _ in range(rounds):
                for s in setups:
                    t = time.perf_counter()
                    s.ops[op]()
                    samples[s.n].append(time.perf_counter() - t)
            for n, values in samples.items():
                out[n][op] = statistics.median(values)
        return out
    finally:
        for s in setups:
            s.close()


def pg_available(url: str) -> str | None:
    try:
        import psycopg

        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=2).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 100_000])
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--out", type=Path, default=None, help="Write a markdown report here.")
    args = parser.parse_args(argv)
    results: dict[str, dict[int, dict[str, float]]] = {}
    notes = []
    for backend in args.backends:
        if backend == "postgresql":
            why = pg_available(args.pg_url)
            if why:
                notes.append(f"PostgreSQL skipped: {why}")
                print(notes[-1], flush=True)
                continue
        results[backend] = measure(backend, args.sizes, args.repeat, args.pg_url)
        for n, r in results[backend].items():
            print(f"{backend:10s} n={n:>7,}  " + "  ".join(f"{k}={v * 1000:.2f}ms" if k != "load_s" else
                                                           f"load={v:.1f}s" for k, v in r.items()), flush=True)
    metrics = ["create", "status", "list", "list_cursor", "metrics", "store_status", "store_list", "sweep",
               "sweep_idle"]
    lines = ["# Records database benchmark (bench/bench_store.py)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
             f"Python {platform.python_version()}; median of {args.repeat} requests (sweeps: of 5) through the real "
             "API in-process (FastAPI TestClient), sizes interleaved call by call (a shared machine's load falls on "
             "all alike), all jobs in one tenant, bulk-inserted over the last 10 s x n: 5 running with live leases "
             "and 3 with expired ones (dead workers) whatever n, the rest 90% succeeded, 5% failed, 5% cancelled.",
             ""]
    for backend, by_n in results.items():
        sizes = sorted(by_n)
        lines += [f"## {backend}", "", "| ms | " + " | ".join(f"{n:,} jobs" for n in sizes)
                  + f" | ratio {sizes[-1]:,} / {sizes[0]:,} |", "|---|" + "---|" * (len(sizes) + 1)]
        for m in metrics:
            values = [by_n[n][m] * 1000 for n in sizes]
            ratio = values[-1] / values[0] if values[0] else float("nan")
            lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {ratio:.2f} |")
            print(f"{backend:10s} {m:12s} ratio {sizes[-1]}/{sizes[0]} = {ratio:.2f}")
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines += ["", "Goal (issue 8): create/status/list flat within 2x from 10 to 100,000 jobs; a sweep <= 1 s at "
              "100,000. `list` reads one keyset page (index on tenant, created_at, id) and the tenant's counter "
              "for `total`; `metrics` reads the five-row job_counts table; the sweep reads two index ranges "
              "(running by lease expiry, queued by resend time) and deletes succeeded jobs past retention."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
