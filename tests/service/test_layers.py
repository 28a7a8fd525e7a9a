"""The library stays a library: every rmt_core module imports with the service's packages made unimportable."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import rmt_core

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = ("fastapi", "starlette", "celery", "kombu", "redis", "sqlalchemy", "alembic", "psycopg",
                "uvicorn", "pydantic_settings", "prometheus_client", "app", "worker", "rmt_service")

BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {SERVICE_ONLY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is blocked: rmt_core must not need it')
sys.meta_path.insert(0, Block())
for name in BLOCKED:
    sys.modules.pop(name, None)
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
print('leaked', leaked)
sys.exit(1 if leaked else 0)
"""


def test_rmt_core_imports_without_the_service_stack():
    modules = sorted(f"rmt_core.{m.name}" for m in pkgutil.iter_modules(rmt_core.__path__) if m.name != "cli")
    assert "rmt_core.pipeline" in modules and "rmt_core.runtime" in modules
    result = subprocess.run([sys.executable, "-c", BLOCKER, *modules], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_the_blocker_really_blocks():
    result = subprocess.run([sys.executable, "-c", BLOCKER, "rmt_service.store"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "blocked" in result.stderr
