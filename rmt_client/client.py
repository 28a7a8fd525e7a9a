"""The synchronous client: ``Client(url, api_key)``; the async one in ``aio.py`` has the same methods."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

from ._common import (DEFAULT_URL, Created, PathLike, Samples, auth_headers, check, classify_parts,
                      classify_results, create_parts, created_from, deadline_after, download_file, expand_images, feedback_parts, update_parts,
                      job_id_of, next_page_params, wait_is_over)


class Client:
    """Talks to one RMT classifier service.

    >>> with Client("http://127.0.0.1:8000") as rmt:
    ...     created = rmt.create("pets/", config={"epochs": 30})      # pets/<label>/<image>
    ...     rmt.wait(created, progress=print)
    ...     rmt.classify(created.classifier_id, "new_photos/")        # [{"filename", "path", "predictions"}]
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=auth_headers(api_key), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- classifiers ---------------------------------------------------------------------------------------
    def create(self, source: Samples, *, name: str | None = None,
               config: Mapping[str, Any] | None = None) -> Created:
        """Upload examples and queue tuning. ``source``: a folder of class folders, a zip with a folder per
        class, or (image, label) pairs (image = path, bytes or PIL image)."""
        files, data = create_parts(source, name, config)
        return created_from(self._http.post("/v1/classifiers", files=files, data=data))

    def get(self, classifier_id: str) -> dict:
        """A classifier: status, labels, settings, validation report."""
        return check(self._http.get(f"/v1/classifiers/{classifier_id}")).json()

    def list(self, page_size: int = 100) -> list[dict]:
        """All of the caller's classifiers, newest first (every page)."""
        return list(self.iter_classifiers(page_size))

    def iter_classifiers(self, page_size: int = 100) -> Iterator[dict]:
        params: dict[str, Any] | None = {"limit": page_size}
        while True:
            page = check(self._http.get("/v1/classifiers", params=params)).json()
            yield from page["items"]
            params = next_page_params(page, page_size)
            if params is None:
                return

    def delete(self, classifier_id: str) -> None:
        """Delete a classifier, its images and artifacts (its job is cancelled if it still runs)."""
        check(self._http.delete(f"/v1/classifiers/{classifier_id}"))

    # -- jobs ----------------------------------------------------------------------------------------------
    def job(self, job: Created | Mapping | str) -> dict:
        """A job's status and progress (step, total_steps, loss, train_accuracy, sparsity, eta_seconds)."""
        return check(self._http.get(f"/v1/jobs/{job_id_of(job)}")).json()

    def cancel(self, job: Created | Mapping | str) -> dict:
        return check(self._http.delete(f"/v1/jobs/{job_id_of(job)}")).json()

    def wait(self, job: Created | Mapping | str, progress: Callable[[dict], Any] | None = None,
             poll: float = 1.0, timeout: float | None = None, raise_on_failure: bool = True) -> dict:
        """Poll until the job has finished; ``progress(job)`` sees every new state. Returns the final job.

        Raises JobFailed if it failed or was cancelled (unless ``raise_on_failure=False``), TimeoutError after
        ``timeout`` seconds.
        """
        deadline = deadline_after(timeout)
        last = None
        while True:
            state = self.job(job)
            if progress is not None and state != last:
                progress(state)
            last = state
            if wait_is_over(state, raise_on_failure, deadline, timeout):
                return state
            time.sleep(poll)

    # -- versions and feedback -----------------------------------------------------------------------------
    def versions(self, classifier_id: str) -> list[dict]:
        """The classifier's versions, newest first; ``serving`` marks the one classify answers with."""
        return check(self._http.get(f"/v1/classifiers/{classifier_id}/versions")).json()["versions"]

    def update(self, classifier_id: str, add: Samples | None = None, *, remove_labels: Sequence[str] = (),
               include_feedback: bool = False, config: Mapping[str, Any] | None = None,
               force: bool = False) -> Created:
        """Queue a new version: the serving one's images plus ``add`` (like create's source; a new label adds a
        class), minus ``remove_labels``, plus the feedback with ``include_feedback``. It serves only if it is
        not worse on the same held-out images, or with ``force``; ``wait`` it and read the job's ``update``."""
        parts = update_parts(add, remove_labels, include_feedback, config, force)
        return created_from(self._http.post(f"/v1/classifiers/{classifier_id}/versions", files=parts))

    def add_class(self, classifier_id: str, name: str, prompt: str | None = None) -> dict:
        """Add a class by its name alone (zero-shot row from the text encoder); the new version serves at once."""
        body = {"name": name, **({"prompt": prompt} if prompt else {})}
        return check(self._http.post(f"/v1/classifiers/{classifier_id}/classes", json=body)).json()

    def serve(self, classifier_id: str, version_id: str) -> dict:
        """Serve this version from now on (rollback or roll forward)."""
        return check(self._http.post(f"/v1/classifiers/{classifier_id}/versions/{version_id}/serve")).json()

    def feedback(self, classifier_id: str, image: Any, label: str, prediction: str | None = None) -> str:
        """Record an image the classifier got wrong with its right label; returns the feedback id."""
        parts = feedback_parts(image, label, prediction)
        return check(self._http.post(f"/v1/classifiers/{classifier_id}/feedback", files=parts)).json()["feedback_id"]

    def list_feedback(self, classifier_id: str) -> list[dict]:
        return check(self._http.get(f"/v1/classifiers/{classifier_id}/feedback")).json()["feedback"]

    # -- classify and download -----------------------------------------------------------------------------
    def classify(self, classifier_id: str, images: Any, top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """Classify one image, a folder, or a list of paths / bytes / PIL images.

        Returns one result per image, in order: ``{"filename", "predictions": [{"label", "score"}], "path"}``
        (``path`` only for files).
        """
        flat = expand_images(images)
        results: list[dict] = []
        for start in range(0, len(flat), batch_size):
            batch = flat[start:start + batch_size]
            response = self._http.post(f"/v1/classifiers/{classifier_id}/classify",
                                       files=classify_parts(batch, start), params={"top_k": top_k})
            results.extend(classify_results(response, batch))
        return results

    def download_model(self, classifier_id: str, path: PathLike) -> Path:
        """The ONNX model, written to ``path``."""
        return self._download(f"/v1/classifiers/{classifier_id}/model.onnx", path)

    def export(self, classifier_id: str, path: PathLike) -> Path:
        """The portable bundle (model.onnx, labels.txt, preprocess.json, README.md) as a zip at ``path``."""
        return self._download(f"/v1/classifiers/{classifier_id}/export", path)

    def _download(self, url: str, path: PathLike) -> Path:
        with download_file(path) as fh:
            with self._http.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    check(response)
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
        return Path(path)

    # -- service -------------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when the service answers /readyz with 200 (store writable, broker reachable)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
