"""Shared request dependencies, as Annotated aliases (the objects live on app.state, built in main)."""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rmt_service.settings import Settings
from rmt_service.store import Store

from .classifier_cache import ClassifierCache
from .errors import ApiError
from .metrics import Metrics
from .queue import JobQueue

DEFAULT_TENANT = "default"

# The dependencies are async: none blocks (app.state reads, a header and an in-memory key table), and FastAPI
# runs a plain ``def`` dependency in the threadpool, a thread hop each (five per classify request).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_cache(request: Request) -> ClassifierCache:
    return request.app.state.cache


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


# Declares the bearer scheme in OpenAPI (the Authorize button in /docs); get_tenant still reads the header itself.
_BEARER = HTTPBearer(auto_error=False, description="An API key from RMT_API_KEYS; not needed when none are set.")


async def get_tenant(request: Request,
                     _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None) -> str:
    """The caller's tenant from ``Authorization: Bearer <key>``; everyone is one tenant when no keys are set."""
    keys: dict[str, str] = request.app.state.tenant_keys
    if not keys:
        return DEFAULT_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <API key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = None
    for key, owner in keys.items():  # compare against every key: timing says nothing about which matched
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    return tenant


async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
    """The records database is down, or a lock was held past its timeout: retryable, and no raw error text."""
    from rmt_service.faults import disk_full

    from .errors import _api_error, error_response, no_space_error

    if disk_full(exc):  # SQLite's file or PostgreSQL's volume is full: 507, like a full blob volume
        return await _api_error(request, no_space_error())

    return error_response(503, "database_unavailable", "the records database did not answer in time; retry "
                                                       "shortly", headers={"Retry-After": "5"})


def install_database_errors(app: FastAPI) -> None:
    app.add_exception_handler(OperationalError, _database_unavailable)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
CacheDep = Annotated[ClassifierCache, Depends(get_cache)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TenantDep = Annotated[str, Depends(get_tenant)]
