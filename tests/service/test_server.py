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
