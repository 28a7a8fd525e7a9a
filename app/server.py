"""`rmt serve`: the API, plus (with the embedded broker) a Celery worker child process.

With no RMT_BROKER_URL the queue is a SQLite file in the data directory, so one command runs the
whole service with nothing else installed. With a Redis broker, workers usually run elsewhere
(`rmt worker`), but ``--worker yes`` starts one here too.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import uvicorn

from rmt_service.settings import Settings

from rmt_core.heap import limit_malloc_arenas

log = logging.getLogger("rmt.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt serve", description="Run the classifier service.")
    parser.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", default=None, help="Data directory (default: RMT_DATA_DIR or ./data).")
    parser.add_argument("--worker", choices=("auto", "yes", "no"), default="auto",
                        help="Start a tuning worker process: auto = only with the embedded broker.")
    parser.add_argument("--log-level", default="info")
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings) -> None:
    """Refuse to expose an unauthenticated API beyond this machine unless told to."""
    if is_loopback(host) or settings.tenant_keys() or settings.allow_insecure_bind:
        return
    raise SystemExit(f"refusing to bind {host} with no API keys: anyone who can reach it could upload and run "
                     "jobs. Set RMT_API_KEYS (tenant:key,...) or RMT_API_KEYS_FILE, or RMT_ALLOW_INSECURE_BIND=1 "
                     "if a proxy in front handles auth.")


def _die_with_parent() -> None:
    """In the child: ask Linux for SIGTERM when the server dies, however it dies (no orphaned worker)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProcess:
    """A `rmt worker` child, restarted if it dies while the server runs."""

    def __init__(self, data_dir: str, log_level: str):
        self.argv = [sys.executable, "-m", "worker", "--data-dir", data_dir, "--loglevel", log_level, "--quiet"]
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._monitor.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self.argv, start_new_session=True, preexec_fn=_die_with_parent)
        log.info("started tuning worker (pid %d)", self.process.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            code = self.process.wait() if self.process else 0
            if self._stopping.is_set():
                return
            log.error("tuning worker exited with %s; restarting in %.0fs", code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 60.0)
            self._spawn()

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # warm shutdown; a job cut short is re-queued by the lease sweep
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


KEEP_ALIVE_S = 5  # uvicorn's default idle keep-alive


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, stopped by SIGTERM without resetting a keep-alive connection.

    uvicorn alone closes every idle keep-alive connection the moment SIGTERM arrives; a client that sent its
    next request on one just then gets a reset (or a closed connection) instead of an answer. Here SIGTERM
    first drains: every answer says ``Connection: close`` (the client opens a fresh connection for its next
    request, elsewhere once the balancer has seen /readyz answer 503), idle connections run out on the
    keep-alive timeout, and the server stops once none is left (at most a keep-alive period and a second
    later), then lets in-flight requests finish as before. A second SIGTERM, or SIGINT, stops at once.
    """

    draining = False
    drain_deadline = 0.0

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.draining and not self.should_exit:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.config.timeout_keep_alive + 1
            log.info("SIGTERM: draining connections before shutting down")
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.draining and not self.should_exit and (
                not self.server_state.connections or time.monotonic() >= self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)

    def drain_wrapper(self, app):
        """The ASGI app, answering with ``Connection: close`` (and /readyz with 503) while draining."""
        async def draining_app(scope, receive, send):
            if scope["type"] != "http" or not self.draining:
                return await app(scope, receive, send)
            if scope.get("path") == "/readyz":
                body = b'{"status":"draining"}'
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return

            async def closing_send(message):
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                await send(message)
            return await app(scope, receive, closing_send)
        return draining_app


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()  # before any thread starts (see rmt_core/heap.py)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    check_bind(args.host, settings)
    from rmt_service.migrate import prepare

    prepare(settings)  # schema at head (and a file-store data dir imported) before any worker starts
    embedded = not settings.broker_url
    worker = None
    if args.worker == "yes" or (args.worker == "auto" and embedded):
        worker = WorkerProcess(str(settings.data_dir), args.log_level)
        worker.start()
    elif embedded:
        log.warning("embedded broker and --worker no: jobs will wait until a `rmt worker --data-dir %s` runs",
                    settings.data_dir)

    from .main import create_app

    log.info("serving on http://%s:%d (data in %s, broker %s)", args.host, args.port, settings.data_dir,
             "embedded SQLite" if embedded else "external")
    # uvicorn re-raises SIGTERM/SIGINT with the handler that was in place before it started; with Python's
    # default SIGTERM action that would kill the process before the finally below stops the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server = DrainingServer(uvicorn.Config(create_app(settings), host=args.host, port=args.port,
                                               log_level=args.log_level, timeout_graceful_shutdown=10,
                                               timeout_keep_alive=KEEP_ALIVE_S))
        server.config.app = server.drain_wrapper(server.config.app)
        server.run()
    finally:
        if worker is not None:
            started = time.monotonic()
            worker.stop()
            log.info("tuning worker stopped in %.1fs", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
