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
