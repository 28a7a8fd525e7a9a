"""`rmt serve` refuses an unauthenticated non-loopback bind unless told to."""
from __future__ import annotations

import pytest

from app.server import check_bind, is_loopback, main
from tests.service.helpers import make_settings


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.5", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("example.com", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_public_bind_needs_keys_or_explicit_permission(tmp_path):
    with pytest.raises(SystemExit, match="RMT_API_KEYS"):
        check_bind("0.0.0.0", make_settings(tmp_path / "d"))
    check_bind("0.0.0.0", make_settings(tmp_path / "d", api_keys="t:k"))
    check_bind("0.0.0.0", make_settings(tmp_path / "d", allow_insecure_bind=True))
    check_bind("127.0.0.1", make_settings(tmp_path / "d"))


def test_serve_refuses_before_starting_anything(tmp_path):
    with pytest.raises(SystemExit, match="refusing to bind 0.0.0.0"):
        main(["--host", "0.0.0.0", "--data-dir", str(tmp_path / "d"), "--worker", "no"])
    assert not (tmp_path / "d" / "broker.sqlite").exists()


def test_the_api_process_never_imports_torch(tmp_path):
    """Serving needs no torch: building the app, the queue producer and the cache must not pull it in."""
    import subprocess
    import sys

    from tests.service.helpers import service_env
    from tests.service.procs import ROOT

    code = ("import sys; from app.main import create_app; from app.server import main; "
            "from rmt_service.settings import Settings; "
            f"create_app(Settings(_env_file=None, data_dir={str(tmp_path / 'd')!r})); "
            "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=service_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigterm_drains_keep_alive_connections(tmp_path):
    """After SIGTERM, a request on a kept-alive connection gets its whole answer, marked `Connection: close`
    (never a reset), /readyz says 503 so a balancer stops sending, and the server then exits by itself."""
    import signal

    import httpx

    from tests.service.helpers import free_port, service_env, wait_for
    from tests.service.procs import Child, rmt

    port = free_port()
    child = Child(rmt("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"), "--worker", "no"),
                  service_env(), tmp_path / "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, what="rmt serve to answer")
        answers = []
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/healthz").headers.get("connection") != "close"  # the connection stays open, idle
            child.signal(signal.SIGTERM)
            for _ in range(100):  # the signal lands at some point between these requests
                response = client.get("/healthz")  # raises on a reset or a connection closed under it
                answers.append(response)
                if response.headers.get("connection") == "close":
                    break
            assert answers[-1].status_code == 200 and answers[-1].headers.get("connection") == "close", \
                child.log()
            assert client.get("/readyz").status_code == 503
        assert child.proc.wait(30) == 0
    finally:
        child.stop()


def test_uvicorn_parses_http_with_httptools():
    """pyproject installs httptools so uvicorn's "auto" picks it over pure-Python h11 (the HTTP goals of
    bench/RESULTS-multitenant.md were met with it and missed without it); dropping it must not go unnoticed."""
    import uvicorn

    async def app(scope, receive, send):  # pragma: no cover - never called
        pass

    config = uvicorn.Config(app)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
