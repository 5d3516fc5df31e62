# Every target sets itself up on a fresh machine: a virtual env in .venv with requirements-dev.txt
# and this package installed in editable mode.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench bench-cpu clean help

help:
	@echo "make test   - set up .venv and run the whole test suite (CPU; Triton kernels via the interpreter)"
	@echo "make demo   - train a small NSTM language model on associative recall on the CPU (<= 3 min)"
	@echo "make bench  - operator benchmarks (GPU sweep when a GPU is present, else the CPU paths)"

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x tests -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m nstm.demo --out out/demo

bench: $(STAMP)
	$(BIN)/python bench/cpu_paths.py --json bench/results/cpu-paths.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
