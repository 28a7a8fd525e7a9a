"""A real browser (Debian's Chromium driven by Playwright) against a real `rmt serve`.

Chromium comes from apt (`make test` installs it); Playwright's own browser download does not work on
these machines. When Chromium or Playwright is missing the tests FAIL, unless `make test` tried to
install Chromium and could not: it then writes the reason to .venv/.no-chromium and the tests skip
with that reason, so the summary says why they did not run.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.service.helpers import free_port, service_env, wait_for
from tests.service.procs import ROOT, Child, rmt

CHROMIUM = os.environ.get("RMT_TEST_CHROMIUM", "/usr/bin/chromium")
NO_CHROMIUM_MARKER = ROOT / ".venv" / ".no-chromium"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run",
               # a fake camera that needs no permission prompt: the webcam snapshot is tested too
               "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
API_KEY = "browser-test-key-0123456789"


def _unavailable(what: str) -> None:
    if NO_CHROMIUM_MARKER.is_file():
        pytest.skip(f"{what}; `make test` could not install it: {NO_CHROMIUM_MARKER.read_text().strip()}")
    pytest.fail(f"{what}. Run `make test` (installs chromium with apt-get and playwright with pip), or "
                "`apt-get install chromium` and `pip install playwright`.", pytrace=False)


# Module scope, not session: Playwright's sync API keeps an event loop running on the main thread while it is
# open, so every later test that calls asyncio.run() (the service tests) would fail with "cannot be called
# from a running event loop" if the browser outlived the browser tests.
@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium is not installed at {CHROMIUM}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


class Serve:
    """`rmt serve` (API + embedded broker + tuning worker) on a free port over a fresh data dir."""

    def __init__(self, tmp: Path, **env: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / "data"
        # The tiny random-init backbone: a job takes seconds on a CPU (the create form sends pretrained: null).
        self.child = Child(rmt("serve", "--port", str(self.port), "--data-dir", str(self.data_dir)),
                           service_env(RMT_JOB_LEASE_SECONDS="4", RMT_DEVICE="cpu", OMP_NUM_THREADS="1",
                                       RMT_DEFAULT_BACKBONE="rmt-tiny-vit", **env),
                           tmp / "serve.log")
        wait_for(self._up, 60, what="rmt serve to answer /healthz")

    def _up(self) -> bool:
        if self.child.proc.poll() is not None:
            raise AssertionError(f"rmt serve exited:\n{self.child.log()}")
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, timeout=30, headers=headers)

    def stop(self) -> None:
        self.child.stop(40)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    # a small image limit, so the form's own check of the server's limits can be seen (test images are ~1 KB)
    server = Serve(tmp_path_factory.mktemp("ui-serve"), RMT_MAX_IMAGE_BYTES="200000")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def serve_with_key(tmp_path_factory):
    server = Serve(tmp_path_factory.mktemp("ui-serve-key"), RMT_API_KEYS=f"team:{API_KEY}")
    yield server
    server.stop()


class Page:
    """A page plus what the tests check on every step: dialogs, JS errors, CSP violations, requests."""

    def __init__(self, page, test_name: str):
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list = []
        self.shots: list[Path] = []
        self._prefix = re.sub(r"[^\w]+", "_", test_name)
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._on_console)
        page.on("request", lambda req: self.requests.append(req))

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _on_console(self, message) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(f"CSP violation: {message.text}")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self._prefix}-{len(self.shots) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path

    def hosts(self) -> set[str]:
        return {urlparse(r.url).hostname or r.url.split(":")[0] for r in self.requests}


@pytest.fixture
def ui(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(15_000)
    page = Page(context.new_page(), request.node.name)
    yield page
    context.close()
    assert not page.errors, page.errors
    assert not page.dialogs, f"a dialog fired: {page.dialogs}"
