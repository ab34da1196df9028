# The short commands the README promises; CI (.ci/run) calls the same ones.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit lint bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: setup
	$(PY) -m lmcache_core.integrations.vllm.demo

test: setup
	bash scripts/install-services.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy  # lmcache_core and plugins/, strict on lmcache_core.plugin_api ([tool.mypy])

bench: setup
	$(PY) benchmarks/bench_storage.py

docs: setup
	$(PY) docs/gen_config.py
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf site build *.egg-info
