"""The asyncio client: the same methods as ``Client``, awaited."""
from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import httpx

from ._common import (DEFAULT_URL, Created, PathLike, Samples, auth_headers, check, classify_parts,
                      classify_results, create_parts, created_from, deadline_after, download_file, expand_images, feedback_parts, update_parts,
                      job_id_of, next_page_params, wait_is_over)


class AsyncClient:
    """Talks to one RMT classifier service from asyncio code.

    >>> async with AsyncClient("http://127.0.0.1:8000") as rmt:
    ...     created = await rmt.create("pets/")
    ...     await rmt.wait(created, progress=print)
    ...     await rmt.classify(created.classifier_id, ["a.jpg", "b.jpg"])
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=auth_headers(api_key), timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create(self, source: Samples, *, name: str | None = None,
                     config: Mapping[str, Any] | None = None) -> Created:
        """Upload examples and queue tuning (see ``Client.create``)."""
        files, data = await asyncio.to_thread(create_parts, source, name, config)  # reads image files
        return created_from(await self._http.post("/v1/classifiers", files=files, data=data))

    async def get(self, classifier_id: str) -> dict:
        return check(await self._http.get(f"/v1/classifiers/{classifier_id}")).json()

    async def list(self, page_size: int = 100) -> list[dict]:
        return [item async for item in self.iter_classifiers(page_size)]

    async def iter_classifiers(self, page_size: int = 100) -> AsyncIterator[dict]:
        params: dict[str, Any] | None = {"limit": page_size}
        while True:
            page = check(await self._http.get("/v1/classifiers", params=params)).json()
            for item in page["items"]:
                yield item
            params = next_page_params(page, page_size)
            if params is None:
                return

    async def delete(self, classifier_id: str) -> None:
        check(await self._http.delete(f"/v1/classifiers/{classifier_id}"))

    async def job(self, job: Created | Mapping | str) -> dict:
        return check(await self._http.get(f"/v1/jobs/{job_id_of(job)}")).json()

    async def cancel(self, job: Created | Mapping | str) -> dict:
        return check(await self._http.delete(f"/v1/jobs/{job_id_of(job)}")).json()

    async def wait(self, job: Created | Mapping | str, progress: Callable[[dict], Any] | None = None,
                   poll: float = 1.0, timeout: float | None = None, raise_on_failure: bool = True) -> dict:
        """Poll until the job has finished (see ``Client.wait``); ``progress`` may be a coroutine function."""
        deadline = deadline_after(timeout)
        last = None
        while True:
            state = await self.job(job)
            if progress is not None and state != last:
                outcome = progress(state)
                if inspect.isawaitable(outcome):
                    await outcome
            last = state
            if wait_is_over(state, raise_on_failure, deadline, timeout):
                return state
            await asyncio.sleep(poll)

    # versions and feedback (see Client for what each does)
    async def versions(self, classifier_id: str) -> list[dict]:
        return check(await self._http.get(f"/v1/classifiers/{classifier_id}/versions")).json()["versions"]

    async def update(self, classifier_id: str, add: Samples | None = None, *, remove_labels: Sequence[str] = (),
                     include_feedback: bool = False, config: Mapping[str, Any] | None = None,
                     force: bool = False) -> Created:
        parts = await asyncio.to_thread(update_parts, add, remove_labels, include_feedback, config, force)
        return created_from(await self._http.post(f"/v1/classifiers/{classifier_id}/versions", files=parts))

    async def add_class(self, classifier_id: str, name: str, prompt: str | None = None) -> dict:
        body = {"name": name, **({"prompt": prompt} if prompt else {})}
        return check(await self._http.post(f"/v1/classifiers/{classifier_id}/classes", json=body)).json()

    async def serve(self, classifier_id: str, version_id: str) -> dict:
        return check(await self._http.post(f"/v1/classifiers/{classifier_id}/versions/{version_id}/serve")).json()

    async def feedback(self, classifier_id: str, image: Any, label: str, prediction: str | None = None) -> str:
        parts = await asyncio.to_thread(feedback_parts, image, label, prediction)
        response = await self._http.post(f"/v1/classifiers/{classifier_id}/feedback", files=parts)
        return check(response).json()["feedback_id"]

    async def list_feedback(self, classifier_id: str) -> list[dict]:
        return check(await self._http.get(f"/v1/classifiers/{classifier_id}/feedback")).json()["feedback"]

    async def classify(self, classifier_id: str, images: Any, top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """Classify one image, a folder, or a list of paths / bytes / PIL images (see ``Client.classify``)."""
        flat = await asyncio.to_thread(expand_images, images)
        results: list[dict] = []
        for start in range(0, len(flat), batch_size):
            batch = flat[start:start + batch_size]
            files = await asyncio.to_thread(classify_parts, batch, start)
            response = await self._http.post(f"/v1/classifiers/{classifier_id}/classify", files=files,
                                             params={"top_k": top_k})
            results.extend(classify_results(response, batch))
        return results

    async def download_model(self, classifier_id: str, path: PathLike) -> Path:
        return await self._download(f"/v1/classifiers/{classifier_id}/model.onnx", path)

    async def export(self, classifier_id: str, path: PathLike) -> Path:
        return await self._download(f"/v1/classifiers/{classifier_id}/export", path)

    async def _download(self, url: str, path: PathLike) -> Path:
        with download_file(path) as fh:
            async with self._http.stream("GET", url) as response:
                if not response.is_success:
                    await response.aread()
                    check(response)
                async for chunk in response.aiter_bytes(1 << 20):
                    fh.write(chunk)
        return Path(path)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
