"""Shared test helpers: generated images and archives, a broker double, polling."""
from __future__ import annotations

import io
import json
import os
import socket
import time
import zipfile
from typing import Callable

from PIL import Image

from app.queue import BrokerUnavailable
from rmt_service.settings import Settings

# The tiny random-init backbone (32 px) and the fewest steps: a job takes seconds on a CPU.
# select="mask": these tests read the mask artifacts of a real (tiny) run; which candidate wins on its own is
# tested in tests/core/test_candidates.py
TINY_CONFIG = {"backbone": "rmt-tiny-vit", "pretrained": None, "epochs": 1, "min_steps": 2, "batch_size": 8,
               "select": "mask"}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def image_bytes(color=(200, 20, 20), size=(40, 40), fmt="PNG", seed: int = 0) -> bytes:
    img = Image.new("RGB", size, color)
    img.putpixel((seed % size[0], (seed // size[0]) % size[1]), (seed % 255, 0, 0))  # distinct files
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def upload_parts(per_class: int = 3, classes=("red", "green")) -> tuple[list, dict]:
    """multipart files + data for a create request: ``per_class`` images per class."""
    files, labels = [], []
    for label in classes:
        for i in range(per_class):
            files.append(("files", (f"{label}-{i}.png", image_bytes(COLORS[label], seed=i), "image/png")))
            labels.append(label)
    return files, {"labels": labels, "config": json.dumps(TINY_CONFIG)}


def zip_bytes(entries: dict[str, bytes | None]) -> bytes:
    """A zip from {member name: content}; None content = a directory entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in entries.items():
            if content is None:
                zf.writestr(zipfile.ZipInfo(name if name.endswith("/") else name + "/"), b"")
            else:
                zf.writestr(name, content)
    return buf.getvalue()


class FakeQueue:
    """Records job ids instead of talking to a broker; ``down = True`` makes it refuse like a dead broker."""

    def __init__(self):
        self.sent: list[str] = []
        self.down = False

    def enqueue(self, job_id: str) -> None:
        if self.down:
            raise BrokerUnavailable("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append(job_id)

    def ping(self) -> None:
        if self.down:
            raise BrokerUnavailable("Connection refused")

    def close(self) -> None:
        pass


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def count_rows(settings: Settings, table: str) -> int:
    """Rows in one table of the records database behind ``settings`` (tests' 'nothing was stored')."""
    from sqlalchemy import text

    from rmt_service.db import Database

    db = Database(settings.effective_database_url)
    try:
        with db.read() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        db.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this one minus any RMT_* the developer had set, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMT_")}
    env.update(overrides)
    return env


def pretty(response) -> str:
    try:
        return json.dumps(response.json())[:600]
    except ValueError:
        return response.text[:600]


def make_settings(data_dir, **overrides) -> Settings:
    """Test settings; ``database_url`` "" = SQLite in the data dir (pass a PostgreSQL URL for that leg)."""
    values = {"data_dir": data_dir, "job_lease_seconds": 5, "max_queued_jobs": 5, "api_keys": "",
              "api_keys_file": None, "broker_url": "", "database_url": ""}
    values.update(overrides)
    return Settings(_env_file=None, **values)
