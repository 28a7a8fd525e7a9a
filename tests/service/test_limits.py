"""Bounded work per request (clear 422/413s), settings checked at start, and faults answered clearly:
a full disk (507, nothing stored), an upload cut off by a shutdown or a dropped connection (503, retryable),
no server paths or raw exception text in what a tenant sees, and bounded /metrics label sets."""
from __future__ import annotations

import asyncio
import errno
import json
import random
import string

import httpx
import pydantic
import pytest
from fastapi.testclient import TestClient

import rmt_service.blobs
from app.main import create_app
from rmt_service.settings import Settings
from tests.service.helpers import TINY_CONFIG, FakeQueue, image_bytes, make_settings, upload_parts, zip_bytes


@pytest.fixture
def make_client(tmp_path):
    """A client over SQLite with some settings changed (these limits do not depend on the database)."""
    clients = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(tmp_path / f"data{len(clients)}", **overrides),
                                       queue=FakeQueue()))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _create(client, config=None, per_class=3, raw_config: str | None = None):
    files, data = upload_parts(per_class=per_class)
    data["config"] = raw_config if raw_config is not None else json.dumps({**TINY_CONFIG, **(config or {})})
    return client.post("/v1/classifiers", files=files, data=data)


def _nothing_stored(client, settings_dir) -> None:
    assert client.get("/v1/classifiers").json()["total"] == 0
    uploads = settings_dir / "blobs" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    tmp = settings_dir / "blobs" / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), "a staging directory was left behind"


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("raw, field", [
    ('{"learning_rate": NaN}', "NaN"), ('{"leak": Infinity}', "Infinity"), ('{"leak": -Infinity}', "Infinity"),
    ('{"epochs": 100000000}', "epochs"), ('{"min_steps": 100000000}', "min_steps"), ('{"seed": -5}', "seed"),
    ('{"seed": 1e400}', "seed"), ('{"learning_rate": 1e400}', "learning_rate"), ('{"holdout": 0.99}', "holdout"), ('{"parity_atol": 0}', "parity_atol"),
    ('{"prompt_template": "{} {}"}', "prompt_template"), ('{"prompt_template": "a {0.__class__}"}', "prompt_template"),
    ('{"prompt_template": "' + "x" * 500 + '{}"}', "prompt_template"),
])
def test_non_finite_and_out_of_range_config_values_answer_422(make_client, raw, field):
    client = make_client()
    merged = json.dumps(TINY_CONFIG)[:-1] + ", " + raw[1:]  # raw JSON (NaN, Infinity, 1e400) over the tiny config
    response = _create(client, raw_config=merged)
    assert response.status_code == 422, response.text
    body = response.json()["error"]
    assert body["code"] == "invalid_config" and field in body["message"], body


def test_total_optimizer_steps_are_capped(make_client):
    client = make_client(max_tune_steps=100)
    response = _create(client, {"epochs": 200, "batch_size": 1, "min_steps": 0})  # 6 images x 200 epochs = 1200
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_much_work" and "1200" in error["message"] and "RMT_MAX_TUNE_STEPS" in error["message"]
    assert _create(client, {"epochs": 10, "batch_size": 1, "min_steps": 0}).status_code == 202  # 60 steps
    # min_steps raises epochs: it counts towards the cap too
    assert _create(client, {"epochs": 1, "batch_size": 8, "min_steps": 5000}).json()["error"]["code"] == "too_much_work"


def test_backbone_and_pretrained_come_from_the_operator_allow_list(make_client):
    client = make_client()
    response = _create(client, {"backbone": "ViT-bigG-14"})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "ViT-bigG-14" in message and "rmt-tiny-vit" in message and "RMT_ALLOWED_BACKBONES" in message
    for pretrained in ("/etc/passwd", "laion2b_s39b_b160k", "../../data/blobs/x.pt"):
        response = _create(client, {"pretrained": pretrained})
        assert response.status_code == 422 and "RMT_ALLOWED_PRETRAINED" in response.json()["error"]["message"]
    # an operator who offers more gets them
    wider = make_client(allowed_backbones="rmt-tiny-vit,rmt-tiny-vit-wide", allowed_pretrained="none")
    assert _create(wider, {"backbone": "rmt-tiny-vit-wide"}).status_code == 202


# ------------------------------------------------------------------------------------------- pixels, zips
def test_total_decoded_pixels_per_create_are_capped(make_client):
    client = make_client(max_request_pixels=40 * 40 * 5)  # six 40x40 images: the sixth goes over
    response = _create(client)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_many_pixels" and "RMT_MAX_REQUEST_PIXELS" in error["message"]
    archive = zip_bytes({f"{label}/{i}.png": image_bytes(seed=i) for label in ("a", "b") for i in range(3)})
    response = client.post("/v1/classifiers", files={"archive": ("x.zip", archive, "application/zip")},
                           data={"config": json.dumps(TINY_CONFIG)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
    assert _create(make_client(max_request_pixels=40 * 40 * 6)).status_code == 202


def test_a_zip_with_too_many_entries_is_refused_before_reading_them(make_client):
    client = make_client(max_archive_members=20)
    entries = {f"a/{i}.png": image_bytes(seed=i) for i in range(2)} | {f"b/{i}.png": image_bytes(seed=i)
                                                                       for i in range(2)}
    entries |= {f"__MACOSX/junk{i}": b"x" for i in range(30)}  # skipped metadata counts: it is parsed too
    response = client.post("/v1/classifiers", files={"archive": ("x.zip", zip_bytes(entries), "application/zip")},
                           data={"config": json.dumps(TINY_CONFIG)})
    assert response.status_code == 413
    assert "RMT_MAX_ARCHIVE_MEMBERS" in response.json()["error"]["message"]


def test_classify_batch_size_and_total_pixels_are_capped(tuned):
    cid = tuned["classifier_id"]
    settings = tuned["settings"].model_copy(update={"max_classify_images": 3, "max_classify_pixels": 40 * 40 * 2})
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        four = [("files", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in range(4)]
        response = client.post(f"/v1/classifiers/{cid}/classify", files=four)
        assert response.status_code == 413 and "RMT_MAX_CLASSIFY_IMAGES" in response.json()["error"]["message"]
        many = [("files", (f"{i}.png", image_bytes(seed=i), "image/png")) for i in range(12)]
        response = client.post(f"/v1/classifiers/{cid}/classify", files=many)  # stopped by the multipart parser
        assert response.status_code == 413 and "RMT_MAX_CLASSIFY_IMAGES=3" in response.json()["error"]["message"]
        response = client.post(f"/v1/classifiers/{cid}/classify", files=four[:3])
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
        assert "RMT_MAX_CLASSIFY_PIXELS" in response.json()["error"]["message"]
        assert client.post(f"/v1/classifiers/{cid}/classify", files=four[:2]).status_code == 200


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("name, value", [
    ("job_lease_seconds", 0), ("job_max_attempts", 0), ("max_files", 0), ("max_image_pixels", -1),
    ("max_upload_bytes", 0), ("classifier_cache_size", 0), ("batch_max_size", 0), ("max_tune_steps", 0),
    ("batch_max_wait_ms", "nan"), ("job_resend_seconds", "inf"),
])
def test_settings_are_validated_at_start(monkeypatch, name, value):
    monkeypatch.setenv(f"RMT_{name.upper()}", str(value))
    with pytest.raises(pydantic.ValidationError) as error:
        Settings(_env_file=None)
    assert name in str(error.value)


def test_rmt_serve_and_worker_refuse_bad_settings_with_a_clear_message(monkeypatch, capsys):
    from rmt_cli.main import main

    monkeypatch.setenv("RMT_JOB_LEASE_SECONDS", "0")
    monkeypatch.setenv("RMT_MAX_FILES", "lots")
    for command in (["serve", "--port", "1"], ["worker"], ["migrate"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "invalid configuration" in err and "RMT_JOB_LEASE_SECONDS='0'" in err and "RMT_MAX_FILES" in err
        assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- faults
def test_disk_full_on_create_answers_507_and_stores_nothing(settings, monkeypatch):
    written = []
    original = rmt_service.blobs._write_file

    def write_until_full(path, data):
        if written:  # the second file finds the volume full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return original(path, data)

    monkeypatch.setattr(rmt_service.blobs, "_write_file", write_until_full)
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        response = _create(client)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "no_space" and "no space left on the data volume" in error["message"]
        assert str(settings.data_dir) not in response.text and "blobs" not in response.text
        _nothing_stored(client, settings.data_dir)
        monkeypatch.setattr(rmt_service.blobs, "_write_file", original)
        assert _create(client).status_code == 202  # space freed: creates work again


def test_a_full_database_volume_answers_507_too(make_client, monkeypatch):
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from rmt_service.store import Store

    def full(*args, **kwargs):
        raise OperationalError("INSERT INTO classifiers ...", {}, sqlite3.OperationalError("database or disk is full"))

    client = make_client()
    monkeypatch.setattr(Store, "create_classifier", full)
    response = _create(client)
    assert response.status_code == 507 and response.json()["error"]["code"] == "no_space"
    assert "INSERT" not in response.text


def test_a_job_that_cannot_write_fails_with_the_no_space_message():
    from rmt_service.faults import job_error

    error = job_error(OSError(errno.ENOSPC, "No space left on device", "/data/blobs/tmp/build-1/head.npz"))
    assert error["code"] == "no_space" and "no space left on the data volume" in error["message"]
    assert "/data" not in error["message"]
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert job_error(wrapped)["code"] == "no_space"
    other = job_error(FileNotFoundError(2, "No such file", "/srv/secret/path.onnx"))
    assert other["code"] == "tuning_failed" and "/srv" not in other["message"]


def test_a_job_whose_publish_finds_the_disk_full_fails_with_that_message(store, settings, monkeypatch):
    """A real tuning run whose artifacts cannot be stored: the job ends failed with the no-space message (never
    stays running), the other classifier stays as it was, and no build directory is left behind."""
    from rmt_core.config import TuneConfig
    from rmt_service.store import Sample
    from worker.tasks import run_tune_job

    def create():
        samples = [Sample(image_bytes(seed=i), label, ".png") for label in ("red", "green") for i in range(3)]
        return store.create_classifier("t", "", samples, TuneConfig.from_dict(TINY_CONFIG).to_dict())

    earlier, earlier_job = create()
    assert run_tune_job(store, settings, earlier_job.job_id) == "succeeded"
    published = store.current_version(earlier.classifier_id)
    record, job = create()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(settings.data_dir / "blobs" / "versions"))

    monkeypatch.setattr(type(store), "publish_version", full)
    assert run_tune_job(store, settings, job.job_id) == "failed"
    final = store.get_job(job.job_id)
    assert final.status == "failed" and final.error["code"] == "no_space"
    assert "no space left on the data volume" in final.error["message"]
    assert str(settings.data_dir) not in final.error["message"]
    assert store.current_version(record.classifier_id) is None
    assert store.current_version(earlier.classifier_id).version_id == published.version_id
    assert not any(store.blobs.tmp.iterdir()), "the build directory was left behind"


def test_a_job_that_cannot_even_make_its_build_dir_fails_and_does_not_keep_its_lease(store, settings, monkeypatch):
    """The build directory is made after the lease heartbeat starts: a full disk there used to escape the job's
    error handling, leaving the heartbeat renewing a 'running' job forever."""
    import threading

    from rmt_core.config import TuneConfig
    from rmt_service.store import Sample
    from worker.tasks import run_tune_job

    samples = [Sample(image_bytes(seed=i), label, ".png") for label in ("red", "green") for i in range(3)]
    _, job = store.create_classifier("t", "", samples, TuneConfig.from_dict(TINY_CONFIG).to_dict())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(store), "new_build_dir", full)
    assert run_tune_job(store, settings, job.job_id) == "failed"
    final = store.get_job(job.job_id)
    assert final.status == "failed" and final.error["code"] == "no_space"
    assert not [t for t in threading.enumerate() if t.name == f"lease-{job.job_id}" and t.is_alive()]


def _asgi_post_cut_off(app, path: str, files, data) -> tuple[int, dict, list]:
    """POST through the ASGI interface, sending half the body and then http.disconnect: what uvicorn's receive
    returns when the connection drops or a shutdown closes it mid-upload."""
    request = httpx.Request("POST", f"http://testserver{path}", files=files, data=data)
    body = request.read()
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("testserver", 80),
             "client": ("127.0.0.1", 5000), "root_path": "", "asgi": {"version": "3.0"}}
    chunks = [{"type": "http.request", "body": body[: len(body) // 2], "more_body": True}]
    sent: list[dict] = []

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body_out)


def test_an_upload_cut_off_mid_body_answers_503_retryable_and_stores_nothing(tmp_path):
    settings = make_settings(tmp_path / "data")
    app = create_app(settings, queue=FakeQueue())
    files, data = upload_parts(per_class=3)
    status, headers, body = _asgi_post_cut_off(app, "/v1/classifiers", files, data)
    assert status == 503, body
    assert body["error"]["code"] == "upload_interrupted" and b"retry-after" in headers
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        _nothing_stored(client, settings.data_dir)


_SERVER = """
import sys, pathlib
import uvicorn
from tests.service.helpers import make_settings, FakeQueue
from app.main import create_app
app = create_app(make_settings(pathlib.Path(sys.argv[2])), queue=FakeQueue())
uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), timeout_graceful_shutdown=1,
                              log_level="warning")).run()
"""


@pytest.mark.parametrize("client_finishes", [False, True])
def test_a_graceful_shutdown_during_an_upload(tmp_path, client_finishes):
    """A real uvicorn gets SIGTERM while a create's body is half sent: an upload that completes within the grace
    period is served (202); one still streaming when it ends is answered 503 + Retry-After (it was a bare 500),
    and nothing is stored."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.service.helpers import free_port, wait_for

    port, data_dir = free_port(), tmp_path / "data"
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(data_dir)], cwd=root)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="the server")
        files, data = upload_parts(per_class=3)
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/v1/classifiers", files=files, data=data)
        body = request.read()
        head = (f"POST /v1/classifiers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                f"{request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(0.3)
            server.send_signal(signal.SIGTERM)
            if client_finishes:
                time.sleep(0.2)
                sock.sendall(body[len(body) // 2:])
            answer = b""
            while chunk := sock.recv(8192):  # headers and body may come in separate packets
                answer += chunk
            answer = answer.decode()
        status = int(answer.split(" ", 2)[1])
        if client_finishes:
            assert status == 202, answer
        else:
            assert status == 503, answer
            assert "retry-after: 5" in answer.lower() and '"shutting_down"' in answer
        server.wait(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
    if not client_finishes:
        with TestClient(create_app(make_settings(data_dir), queue=FakeQueue())) as client:
            _nothing_stored(client, data_dir)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_image_errors_show_no_decoder_text(make_client):
    client = make_client()
    files, data = upload_parts(per_class=3)
    broken = image_bytes()[:60]
    files[0] = ("files", ("broken.png", broken, "image/png"))
    response = client.post("/v1/classifiers", files=files, data=data)
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    assert message == "files[0] (broken.png) is truncated or corrupt", message  # not Pillow's own words
    files[2] = ("files", ("second.png", broken, "image/png"))  # every bad file is named, by its file name
    message = client.post("/v1/classifiers", files=files, data=data).json()["error"]["message"]
    assert message == ("2 files cannot be used: files[0] (broken.png) is truncated or corrupt; "
                       "files[2] (second.png) is truncated or corrupt"), message


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_labels_stay_bounded_under_random_methods_and_paths(make_client):
    client = make_client()
    rng = random.Random(3)
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "BREW", "MKCOL"]
    for _ in range(150):
        method = rng.choice(methods) if rng.random() < 0.7 else "".join(rng.choices(string.ascii_uppercase, k=7))
        path = "/" + "/".join("".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(1, 12)))
                              for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            path = f"/v1/classifiers/{''.join(rng.choices(string.hexdigits, k=16))}"
        client.request(method, path)
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("rmt_http_requests_total{")]
    labels = [dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
              for line in lines]
    methods_seen = {label["method"].strip('"') for label in labels}
    routes_seen = {label["route"].strip('"') for label in labels}
    assert methods_seen <= {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "other"}, methods_seen
    assert "other" in methods_seen
    assert all(route.startswith("/") or route == "unmatched" for route in routes_seen)
    assert "unmatched" in routes_seen
    assert not any(len(part) == 16 and part in route for route in routes_seen for part in route.split("/")), \
        "a raw id reached a label"
    assert len(lines) < 60, f"{len(lines)} label sets after 150 random requests"
