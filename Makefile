# Two entry points (README Quickstart): `make demo` runs the main job, `make test` runs every check.
# Both create .venv and install the project on first use (pip takes torch 2.14.1 from this machine's disk).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# A venv made before the base install went CPU-only holds onnxruntime-gpu: it and onnxruntime share the
	# `onnxruntime` package, so take both out and let the install below put plain onnxruntime back.
	if $(BIN)/pip show --quiet onnxruntime-gpu 2>/dev/null; then \
		$(BIN)/pip uninstall --quiet -y onnxruntime-gpu onnxruntime; fi
	$(BIN)/pip install --quiet -e '.[tune,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	bash scripts/ensure-redis.sh
	bash scripts/ensure-chromium.sh
	bash docker/check.sh
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not browser"

clean:
	rm -rf $(VENV) runs
