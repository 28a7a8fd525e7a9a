"""rmt_client (sync and async) and `rmt remote` against a real `rmt serve` (API + embedded Celery worker)."""
from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import zipfile

import httpx
import pytest
from PIL import Image

from rmt_client import AsyncClient, Client, JobFailed, RmtError
from tests.service.helpers import COLORS, TINY_CONFIG, free_port, image_bytes, service_env, wait_for
from tests.service.procs import ROOT, Child, rmt

pytestmark = pytest.mark.integration
API_KEY = "client-test-key"


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `rmt serve` with an API key, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("client")
    port = free_port()
    child = Child(rmt("serve", "--port", str(port), "--data-dir", str(tmp / "data")),
                  service_env(RMT_JOB_LEASE_SECONDS="4", RMT_DEVICE="cpu", RMT_API_KEYS=f"acme:{API_KEY}"),
                  tmp / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base) or child.proc.poll() is not None, 60, what="rmt serve to answer /healthz")
        assert child.proc.poll() is None, child.log()
        yield {"url": base, "child": child}
    finally:
        child.stop(40)


@pytest.fixture
def class_folders(tmp_path):
    """pets/<label>/<image>.png, three images per class, plus a stray non-image file the client must skip."""
    root = tmp_path / "pets"
    for label in ("red", "green"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{label}-{i}.png").write_bytes(image_bytes(COLORS[label], seed=i))
    (root / "red" / "notes.txt").write_text("not an image")
    return root


def test_sync_client_create_wait_classify_export_delete(server, class_folders, tmp_path):
    seen = []
    with Client(server["url"], api_key=API_KEY) as client:
        assert client.ready()
        created = client.create(class_folders, name="pets", config=TINY_CONFIG)
        job = client.wait(created, progress=seen.append, poll=0.3, timeout=120)
        assert job["status"] == "succeeded" and seen[-1] == job and len(seen) >= 2
        assert seen[0]["status"] in ("queued", "running")

        classifier = client.get(created.classifier_id)
        assert classifier["status"] == "ready" and classifier["name"] == "pets"
        assert sorted(classifier["labels"]) == ["green", "red"] and classifier["n_images"] == 6
        assert created.classifier_id in [c["classifier_id"] for c in client.list()]

        new = tmp_path / "new"
        new.mkdir()
        (new / "b.png").write_bytes(image_bytes(COLORS["green"], seed=9))
        (new / "a.png").write_bytes(image_bytes(COLORS["red"], seed=8))
        pil = Image.new("RGB", (30, 50), COLORS["red"])
        results = client.classify(created.classifier_id, [new, pil, image_bytes(COLORS["green"])], top_k=2,
                                  batch_size=2)  # 4 images in 2 requests
        assert [r["filename"] for r in results] == ["a.png", "b.png", "image-2.png", "image-3"]
        assert [r.get("path") for r in results[:2]] == [str(new / "a.png"), str(new / "b.png")]
        assert all(len(r["predictions"]) == 2 and {p["label"] for p in r["predictions"]} == {"red", "green"}
                   for r in results)

        model = client.download_model(created.classifier_id, tmp_path / "out" / "model.onnx")
        assert model.stat().st_size > 1000 and not list(model.parent.glob(".*.part"))
        bundle = client.export(created.classifier_id, tmp_path / "out" / "pets.zip")
        assert "labels.txt" in zipfile.ZipFile(bundle).namelist()

        client.delete(created.classifier_id)
        with pytest.raises(RmtError) as missing:
            client.get(created.classifier_id)
        assert missing.value.status == 404 and missing.value.code == "not_found"

    with Client(server["url"]) as anonymous, pytest.raises(RmtError) as denied:
        anonymous.list()
    assert denied.value.status == 401


def test_async_client_from_a_zip_with_pil_images(server, class_folders):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(class_folders.rglob("*.png")):
            zf.write(path, f"{path.parent.name}/{path.name}")
    archive = class_folders.parent / "pets.zip"
    archive.write_bytes(buf.getvalue())

    async def flow():
        seen = []

        async def progress(job):  # a coroutine callback is awaited
            seen.append(job["status"])

        async with AsyncClient(server["url"], api_key=API_KEY) as client:
            created = await client.create(archive, config=TINY_CONFIG)
            job = await client.wait(created.job_id, progress=progress, poll=0.3, timeout=120)
            images = [Image.new("RGB", (40, 40), COLORS["red"]), Image.new("RGB", (40, 40), COLORS["green"])]
            results = await client.classify(created.classifier_id, images, top_k=1)
            listed = await client.list(page_size=1)
            await client.delete(created.classifier_id)
            return job, seen, results, listed, created

    job, seen, results, listed, created = asyncio.run(flow())
    assert job["status"] == "succeeded" and seen[-1] == "succeeded"
    assert [r["filename"] for r in results] == ["image-0.png", "image-1.png"]
    assert all(len(r["predictions"]) == 1 for r in results)
    assert created.classifier_id in [c["classifier_id"] for c in listed]


def test_wait_raises_when_the_job_fails(server, tmp_path):
    """A job that cannot succeed (a backbone the worker cannot build) ends wait() with JobFailed."""
    root = tmp_path / "bad"
    for label in ("red", "green"):
        (root / label).mkdir(parents=True)
        (root / label / "x.png").write_bytes(image_bytes(COLORS[label]))
    with Client(server["url"], api_key=API_KEY) as client:
        try:
            created = client.create(root, config={**TINY_CONFIG, "backbone": "no-such-backbone"})
        except RmtError as exc:  # rejected up front by servers that validate the backbone: also fine
            assert exc.status == 422 and "backbone" in exc.message
            return
        with pytest.raises(JobFailed) as failed:
            client.wait(created, poll=0.3, timeout=120)
        assert failed.value.job["status"] == "failed"
        client.delete(created.classifier_id)


def _remote(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmt_cli", "remote", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180,
                          env=service_env(RMT_URL=server["url"], RMT_API_KEY=API_KEY, OMP_NUM_THREADS="1"))


def test_rmt_remote_commands(server, class_folders, tmp_path):
    config = json.dumps(TINY_CONFIG)
    created = _remote(server, "create", str(class_folders), "--name", "cli", "--config", config, "--wait", "--json")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["job"]["status"] == "succeeded" and body["classifier"]["status"] == "ready"
    cid, jid = body["classifier"]["classifier_id"], body["job"]["job_id"]

    status = _remote(server, "status", jid, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    status = _remote(server, "status", cid)
    assert status.returncode == 0 and "ready" in status.stdout and "labels" in status.stdout

    classify = _remote(server, "classify", cid, str(class_folders / "red"), "--json", "--top-k", "1")
    assert classify.returncode == 0, classify.stderr
    lines = [json.loads(line) for line in classify.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in sorted((class_folders / "red").glob("*.png"))]
    csv_out = _remote(server, "classify", cid, str(class_folders / "red" / "red-0.png"), "--format", "csv")
    assert csv_out.stdout.splitlines()[0] == "image,rank,label,score"

    listed = _remote(server, "list", "--json")
    assert cid in [c["classifier_id"] for c in json.loads(listed.stdout)]
    assert cid in _remote(server, "list").stdout

    exported = _remote(server, "export", cid, str(tmp_path / "b.zip"), "--json")
    assert exported.returncode == 0 and json.loads(exported.stdout)["bytes"] > 1000

    deleted = _remote(server, "delete", cid, "--json")
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"deleted": cid}
    gone = _remote(server, "status", cid)
    assert gone.returncode == 1 and gone.stderr.startswith("rmt: error: the service answered 404 not_found")
    assert "Traceback" not in gone.stderr


def test_readme_client_snippet_runs(server, class_folders, tmp_path):
    """The README's Python client example, run as written against the server (its toy settings swapped in)."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Python client.**"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in (('"http://127.0.0.1:8000"', repr(server["url"])), ("api_key=None", f"api_key={API_KEY!r}"),
                     ('config={"epochs": 30}', f"config={TINY_CONFIG!r}")):
        assert snippet.count(old) == 1, old
        snippet = snippet.replace(old, new)
    assert class_folders == tmp_path / "pets"  # the snippet's "pets/"
    (tmp_path / "new_photos").mkdir()
    (tmp_path / "new_photos" / "n.png").write_bytes(image_bytes(COLORS["red"], seed=4))
    (tmp_path / "snippet.py").write_text(snippet)
    run = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env=service_env(PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "succeeded" in run.stdout and "n.png {'label': " in run.stdout
    assert zipfile.is_zipfile(tmp_path / "pets.zip")


def test_embedded_server_log_is_quiet(server):
    """No Celery banner, no SecurityWarning (these tests run as root) and no terminal escapes in `rmt serve`'s
    log; runs last in this module, after jobs ran through the embedded worker."""
    log = server["child"].log_path.read_text(errors="replace")
    assert "rmt.serve: serving on" in log and " ready." in log  # it is the log of a working server
    for noise in ("[queues]", "-------------- ", ".> transport:", "[tasks]", "SecurityWarning",
                  "superuser privileges", "\x1b["):
        assert noise not in log, noise
    # the toy jobs ran under the min_steps floor: the designed default, logged as information, not as a warning
    assert "INFO rmt_core.tuning: epochs raised by min_steps" in log
    assert "WARNING rmt_core.tuning: epochs raised" not in log


def test_create_parts_from_folders_zips_and_pairs(tmp_path, class_folders):
    """What the client uploads for each kind of source (no server needed)."""
    from rmt_client._common import create_parts

    files, data = create_parts(class_folders, "pets", {"epochs": 3})
    assert [name for _, (name, _, _) in files] == ["green-0.png", "green-1.png", "green-2.png",
                                                   "red-0.png", "red-1.png", "red-2.png"]  # notes.txt skipped
    assert data["labels"] == ["green"] * 3 + ["red"] * 3 and json.loads(data["config"]) == {"epochs": 3}

    split = tmp_path / "split"
    (split / "test" / "red").mkdir(parents=True)
    (split / "test" / "red" / "t.png").write_bytes(image_bytes())
    (split / "train").symlink_to(class_folders, target_is_directory=True)
    files, data = create_parts(split, None, None)
    assert len(files) == 6 and "config" not in data and "name" not in data  # the train split only

    (class_folders / "blue").mkdir()
    with pytest.raises(ValueError, match="blue holds no images"):
        create_parts(class_folders, None, None)

    files, data = create_parts([(Image.new("RGB", (4, 4)), "a"), (b"\x89PNG...", "b")], None, None)
    assert [name for _, (name, _, _) in files] == ["image-0.png", "image-1"] and data["labels"] == ["a", "b"]
    with pytest.raises(ValueError, match="neither a folder"):
        create_parts(tmp_path / "missing", None, None)


def test_expand_images_takes_one_image_a_folder_or_a_list(tmp_path):
    from rmt_client._common import expand_images

    (tmp_path / "b.png").write_bytes(image_bytes())
    (tmp_path / "a.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (tmp_path / "notes.txt").write_text("x")
    pil = Image.new("RGB", (4, 4))
    assert expand_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert expand_images(str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    assert expand_images(b"raw") == [b"raw"] and expand_images(bytearray(b"raw")) == [bytearray(b"raw")]
    assert expand_images(pil) == [pil] and expand_images([pil, tmp_path]) == [pil, tmp_path / "a.jpg",
                                                                               tmp_path / "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        expand_images(tmp_path / "empty")


def test_demo_output_has_no_banner_or_warnings(tmp_path):
    """`make demo` (scripts/demo.py: rmt serve + rmt_client), shortened to a few steps: all four stages print,
    and nothing else does: no Celery banner, no Python or log warnings, no traceback."""
    run = subprocess.run([sys.executable, "scripts/demo.py", "--data-dir", str(tmp_path / "data"), "--per-class", "6",
                          "--config", json.dumps({"epochs": 1, "min_steps": 4})], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=service_env(OMP_NUM_THREADS="1"))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "Validation report"):
        assert stage in run.stdout, stage
    # four steps flip no mask, which the run rightly warns about; the real demo runs 300
    expected = "WARNING rmt_core.tuning: NO MASK FLIPPED"
    output = "\n".join(line for line in output.splitlines() if expected not in line)
    for noise in ("[queues]", ".> transport:", "Warning", "WARNING", "Traceback", "\x1b["):
        assert noise not in output, (noise, output[-3000:])
