"""/v1/jobs: follow a tuning job, or cancel it."""
from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import StoreDep, TenantDep
from ..errors import ApiError
from ..schemas import ErrorBody, JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409)}


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def read_job(job_id: str, store: StoreDep, tenant: TenantDep) -> JobPublic:
    """Status, progress (step, loss, accuracy, sparsity, ETA) and error of a tuning job."""
    job = store.get_job(job_id, tenant)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return JobPublic.from_record(job)


@router.delete("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def cancel_job(job_id: str, response: Response, store: StoreDep, tenant: TenantDep) -> JobPublic:
    """Cancel a queued job at once, or ask a running one to stop (it ends as "cancelled" within seconds)."""
    job = store.cancel_job(job_id, tenant)  # one conditional update; nothing waits on a lock
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, "job_finished", f"job {job_id} already {job.status}; nothing to cancel")
    response.status_code = 202 if job.status == "running" else 200
    return JobPublic.from_record(job)
