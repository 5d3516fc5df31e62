# Every target sets itself up on a fresh machine: a virtual env in .venv with requirements-dev.txt
# and this package installed in editable mode.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint fuzz demo bench bench-gpu bench-wheels compile-check data clean help

help:
	@echo "make test   - set up .venv, lint, and run the whole test suite (CPU; Triton kernels via the interpreter)"
	@echo "make lint   - ruff (rules in pyproject.toml)"
	@echo "make fuzz N=10000 - N random configurations of the operator against the reference (chunked; BACKEND=triton too)"
	@echo "make demo   - train a small NSTM language model on associative recall on the CPU (<= 3 min)"
	@echo "make bench  - operator sweep and model throughput (GPU when present, else small CPU runs)"
	@echo "make data   - download MNIST and Shakespeare into data/ (idempotent, checksummed)"
	@echo "make bench-gpu - the benchmarks with the system python (a GPU machine with torch installed, no venv)"
	@echo "make compile-check - compile every Triton kernel for sm_80/sm_90 without a GPU: registers, spills, shared memory"

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

N ?= 2000
BACKEND ?= chunked
fuzz: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m tests.ops.fuzz --n $(N) --backend $(BACKEND)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x tests -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m nstm.demo --out out/demo

# fla-core (for the chunk_gsa / chunk_gla rows) installs from .whl/ when it is there (make
# bench-wheels fills it; carry it to an offline GPU machine), else from PyPI, else the sweep skips it.
FLA_WHEELS = fla-core==0.6.0 einops

bench: $(STAMP)
	-$(BIN)/python -m pip install -q --no-deps --no-index --find-links .whl $(FLA_WHEELS) 2>/dev/null || \
	  $(BIN)/python -m pip install -q --no-deps $(FLA_WHEELS) 2>/dev/null || true
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/cpu_paths.py --json bench/results/cpu-paths.json
	$(BIN)/python bench/cpu.py
	$(BIN)/python bench/flops.py

bench-gpu:
	-$(PY) -m pip install -q --no-deps --no-index --find-links .whl --target /tmp/nstm-site $(FLA_WHEELS) 2>/dev/null
	PYTHONPATH=$(CURDIR):/tmp/nstm-site $(PY) bench/sweep.py
	PYTHONPATH=$(CURDIR):/tmp/nstm-site $(PY) bench/models.py

compile-check: $(STAMP)
	$(BIN)/python bench/compile_check.py --arch 90 80 --dims 64 128

bench-wheels:
	$(PY) -m pip download -q --no-deps -d .whl $(FLA_WHEELS)

data: $(STAMP)
	$(BIN)/python -m nstm.data fetch --root data

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
