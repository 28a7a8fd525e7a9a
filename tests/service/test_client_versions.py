"""rmt_client (sync and async) and `rmt remote` over the version routes, against a real `rmt serve`."""
from __future__ import annotations

import asyncio
import json

import pytest

from rmt_client import AsyncClient, Client, RmtError
from tests.service.helpers import COLORS, TINY_CONFIG, image_bytes
from tests.service.test_client import API_KEY, _remote, server  # noqa: F401 (server: the module's fixture)

pytestmark = pytest.mark.integration


def _folders(root, classes=("red", "green"), per_class=5, seed=0):
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            (root / label / f"{label}-{i}.png").write_bytes(image_bytes(COLORS[label], seed=seed + i))
    return root


def test_sync_client_versions_update_serve_feedback(server, tmp_path):  # noqa: F811
    with Client(server["url"], api_key=API_KEY) as client:
        created = client.create(_folders(tmp_path / "train"), config=TINY_CONFIG)
        client.wait(created, poll=0.3, timeout=180)
        first = client.versions(created.classifier_id)
        serving = next(v for v in first if v["serving"])
        assert serving["source"] == "build" and serving["images"] == {"green": 5, "red": 5}

        feedback_id = client.feedback(created.classifier_id, image_bytes(COLORS["red"], seed=40), "red",
                                      prediction="green")
        assert [f["feedback_id"] for f in client.list_feedback(created.classifier_id)] == [feedback_id]

        update = client.update(created.classifier_id, _folders(tmp_path / "more", ("blue",), seed=20),
                               include_feedback=True, force=True)
        job = client.wait(update, poll=0.3, timeout=180)
        report = job["update"]
        assert report["served"] and report["added_classes"] == ["blue"] and report["feedback_images"] == 1
        assert report["warm_start"]["from_version"] == serving["version_id"]
        assert client.classify(created.classifier_id, image_bytes(COLORS["blue"]))[0]["predictions"]

        added = client.add_class(created.classifier_id, "yellow", prompt="a yellow square")
        assert added["serving"] and added["labels"][-1] == "yellow" and added["source"] == "class_by_name"
        with pytest.raises(RmtError) as exists:
            client.add_class(created.classifier_id, "yellow")
        assert exists.value.status == 409 and exists.value.code == "class_exists"

        back = client.serve(created.classifier_id, serving["version_id"])
        assert back["serving"] and client.get(created.classifier_id)["version_id"] == serving["version_id"]
        with pytest.raises(RmtError) as unknown:
            client.serve(created.classifier_id, "ver_" + "0" * 24)
        assert unknown.value.status == 404


def test_async_client_versions(server, tmp_path):  # noqa: F811
    async def main():
        async with AsyncClient(server["url"], api_key=API_KEY) as client:
            created = await client.create(_folders(tmp_path / "train"), config=TINY_CONFIG)
            await client.wait(created, poll=0.3, timeout=180)
            await client.feedback(created.classifier_id, image_bytes(COLORS["green"], seed=30), "green")
            assert len(await client.list_feedback(created.classifier_id)) == 1
            added = await client.add_class(created.classifier_id, "blue")
            versions = await client.versions(created.classifier_id)
            assert [v["version_id"] for v in versions if v["serving"]] == [added["version_id"]]
            build = next(v for v in versions if v["source"] == "build" and v["final"])
            assert (await client.serve(created.classifier_id, build["version_id"]))["serving"]
            update = await client.update(created.classifier_id, include_feedback=True, force=True)
            job = await client.wait(update, poll=0.3, timeout=180)
            assert job["status"] == "succeeded" and job["update"]["feedback_images"] == 1

    asyncio.run(main())


def test_rmt_remote_version_commands(server, tmp_path):  # noqa: F811
    created = _remote(server, "create", str(_folders(tmp_path / "train")), "--config", json.dumps(TINY_CONFIG),
                      "--wait", "--json")
    assert created.returncode == 0, created.stderr
    cid = json.loads(created.stdout)["classifier"]["classifier_id"]
    listed = _remote(server, "versions", cid)
    assert listed.returncode == 0 and listed.stdout.count("*") == 1 and "build" in listed.stdout
    build = next(v for v in json.loads(_remote(server, "versions", cid, "--json").stdout) if v["serving"])

    image = tmp_path / "wrong.png"
    image.write_bytes(image_bytes(COLORS["red"], seed=50))
    recorded = _remote(server, "feedback", cid, str(image), "--label", "red", "--prediction", "green")
    assert recorded.returncode == 0 and "recorded fb_" in recorded.stdout, recorded.stderr
    assert "red" in _remote(server, "feedback", cid).stdout
    missing = _remote(server, "feedback", cid, str(image))
    assert missing.returncode != 0 and "--label" in missing.stderr

    added = _remote(server, "add-class", cid, "blue", "--json")
    assert added.returncode == 0 and json.loads(added.stdout)["labels"][-1] == "blue", added.stderr
    refused = _remote(server, "add-class", cid, "blue")
    assert refused.returncode == 1 and "class_exists" in refused.stderr

    served = _remote(server, "serve", cid, build["version_id"])
    assert served.returncode == 0 and build["version_id"] in served.stdout, served.stderr
    updated = _remote(server, "update", cid, "--feedback", "--force", "--wait")
    assert updated.returncode == 0 and "serves" in updated.stdout, updated.stderr + updated.stdout
    bad = _remote(server, "update", cid, "--remove", "red")
    assert bad.returncode == 1 and "too_few_classes" in bad.stderr
