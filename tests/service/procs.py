"""Real processes for integration tests: a private redis-server, `rmt worker`, `rmt serve`.

Each is started on its own port / process group and stopped by its own pid, so the machine's Redis
on 6379 and anyone else's processes are never touched.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.service.helpers import free_port, service_env, wait_for

ROOT = Path(__file__).resolve().parents[2]


class RedisServer:
    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        # --save "" / no AOF: a restart loses the queue, the worst case the service must survive.
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: self._ping(client), 10, what="redis-server to answer")
        return self

    @staticmethod
    def _ping(client) -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Child:
    """A child process in its own session, its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_log(self, text: str, timeout: float) -> None:
        wait_for(lambda: text in self.log_path.read_text(errors="replace") or self.proc.poll() is not None,
                 timeout, what=f"{text!r} in {self.log_path.name}")
        if self.proc.poll() is not None:
            raise AssertionError(f"process exited with {self.proc.returncode}:\n{self.log()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (its session)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._log.close()
        return self.proc.returncode


def rmt(*args: str) -> list[str]:
    """The `rmt` command of this checkout (python -m so the test does not depend on an installed script)."""
    return [sys.executable, "-m", "rmt_cli", *args]


def start_worker(data_dir: Path, broker_url: str, log_path: Path, **env: str) -> Child:
    child = Child(rmt("worker", "--data-dir", str(data_dir), "--loglevel", "info"),
                  service_env(RMT_BROKER_URL=broker_url, RMT_JOB_LEASE_SECONDS="4", RMT_DEVICE="cpu", **env),
                  log_path)
    child.wait_log(" ready.", 60)
    return child


def wait_job(get_job, timeout: float, until=("succeeded", "failed", "cancelled")) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] in until else None)(get_job()), timeout, interval=0.3,
                    what=f"job to reach {until}")


def time_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
