# One-command set-up on a fresh machine: `make test`, `make demo`.
# GPU users: create $(VENV) with their own torch first (or `make setup TORCH_SPEC=torch`);
# torch is installed here only when the venv has none.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
SEQ ?= 8192
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(NPROC) examples/ring_demo.py --seq-len $(SEQ)
	OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=1048576 $(VENV)/bin/torchrun --nproc-per-node $(NPROC) examples/train_llama.py

bench: setup
	$(PY) benchmarks/ring_cpu.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
