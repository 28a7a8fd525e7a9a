"""Builds the FastAPI app: settings, store, queue, classifier cache, metrics, routers, error handlers.

Run it with ``rmt serve`` (app.server), or ``uvicorn --factory app.main:create_app``.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rmt_core import __version__
from rmt_core.heap import limit_malloc_arenas
from rmt_service.settings import Settings
from rmt_service.migrate import prepare, wait_until_ready
from rmt_service.store import Store

from .classifier_cache import ClassifierCache, served_loader
from .deps import install_database_errors
from .errors import install_error_handlers
from .limits import BodySizeLimit, ShutdownAnswer
from .metrics import Metrics, MetricsMiddleware
from .openapi import install_openapi
from .queue import JobQueue
from .routers import classifiers, classify, docs, export, health, jobs, ui, versions

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """A ready-to-serve app over ``settings.data_dir``; ``queue`` replaces the broker producer (tests)."""
    # Here, not only in `rmt serve`: `uvicorn --factory app.main:create_app` starts no thread of ours before this
    # (rmt_core/heap.py says why; the API image sets MALLOC_ARENA_MAX itself, which wins).
    limit_malloc_arenas()
    settings = settings or Settings()
    store = Store(settings)
    if settings.database_migrate:  # once per start; replicas serialise on a database lock
        prepare(settings, store.db)
    else:
        wait_until_ready(store.db)
    tenant_keys = settings.tenant_keys()  # a malformed key list stops startup, not the first request
    try:  # uploads a crashed API process left half-written in blobs/tmp (rmt_service owns the cleaning)
        store.clean_staging()
    except Exception:
        log.warning("cleaning staging at start failed; the workers' collection retries", exc_info=True)
    metrics = Metrics(store)
    from rmt_core.runtime import import_loading_modules  # loaded lazily like the cache's loaders

    import_loading_modules()  # at start, not inside the first classify of a fresh install (0.76 s here)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.cache.close()
        app.state.queue.close()
        app.state.store.close()

    # docs_url/redoc_url None: FastAPI's pages load Swagger UI from a CDN; routers/docs.py serves them offline
    app = FastAPI(title="RMT classifier service", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Few-shot images in, a mask-tuned CLIP classifier out (R-AMT, ICCV 2023), served "
                              "with ONNX Runtime. Create a classifier, follow its job, then classify.")
    app.state.settings = settings
    app.state.store = store
    app.state.tenant_keys = tenant_keys
    app.state.metrics = metrics
    app.state.queue = queue or JobQueue(settings)
    app.state.cache = ClassifierCache(settings.classifier_cache_size, max_bytes=settings.classifier_cache_bytes,
                                      providers=settings.ort_providers,
                                      batch_max_size=settings.batch_max_size,
                                      batch_max_wait_ms=settings.batch_max_wait_ms, metrics=metrics,
                                      promote_after=settings.serving_promote_after,
                                      loader=served_loader(store.bases_dir, settings.ort_providers,
                                                           mode=settings.serving_mode,
                                                           precision=settings.serving_precision))
    install_error_handlers(app)
    install_database_errors(app)
    for router in (health.router, classifiers.router, classify.router, jobs.router, ui.router, versions.router):
        app.include_router(router)
    app.include_router(export.router)
    app.include_router(docs.router)
    docs.mount_docs_assets(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ShutdownAnswer)  # a request cut short by shutdown: 503, retryable
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
