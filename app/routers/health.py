"""Probes and metrics: /healthz (process up), /readyz (store writable with free space, records writable, broker
reachable; inference device), /metrics."""
from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from rmt_core.runtime import inference_device

from ..deps import MetricsDep, QueueDep, SettingsDep, StoreDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep, queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Ready to accept work: the data directory is writable with at least RMT_MIN_FREE_BYTES free, the records
    database takes a write (not locked, not read-only), and the broker answers. 503 whenever a create would fail.

    ``inference`` says what classification runs on: ``device`` "cuda" or "cpu" and the ONNX Runtime execution
    providers in priority order (the GPU API image on a host without a usable GPU reports "cpu").
    """
    checks = {}
    for name, check in (("store", store.check_writable), ("space", store.check_space),
                        ("records", store.check_records_writable), ("broker", queue.ping)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception:  # the reason goes to the log: /readyz answers anyone, and must not show hosts or paths
            log.warning("readiness check %s failed", name, exc_info=True)
            checks[name] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    # Decided once per process (the first call may probe CUDA with a one-node session, hence the thread).
    inference = await run_in_threadpool(inference_device, settings.ort_providers)
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks, "inference": inference},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format.",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
