# Every target sets itself up on a fresh machine: a virtual env in .venv with requirements-dev.txt
# and this package installed in editable mode.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint fuzz demo bench bench-deps bench-gpu bench-gpu-deps bench-wheels compile-check data clean help

help:
	@echo "make test   - set up .venv, lint, and run the whole test suite (CPU; Triton kernels via the interpreter)"
	@echo "make lint   - ruff (rules in pyproject.toml)"
	@echo "make fuzz N=10000 - N random configurations of the operator against the reference (chunked; BACKEND=triton too)"
	@echo "make demo   - train a small NSTM language model on associative recall on the CPU (<= 3 min)"
	@echo "make bench  - operator sweep, model throughput, CPU paths, FLOPs (GPU when present, else small CPU runs); new files in bench/results/"
	@echo "make bench-deps - install fla-core + einops into .venv (the sweep's fla rows on a GPU); make bench installs nothing"
	@echo "make data   - download MNIST and Shakespeare into data/ (idempotent, checksummed)"
	@echo "make bench-gpu - the benchmarks with the system python (a GPU machine with torch installed, no venv)"
	@echo "make bench-gpu-deps - install fla-core + einops from .whl/ into $(GPU_SITE) for bench-gpu"
	@echo "make compile-check - compile every Triton kernel for sm_80/sm_90 without a GPU: registers, spills, shared memory"

# torch comes first, as a CPU build. `pip install torch==X` picks a CPU build where one lies in the
# configured package sources (this machine's local wheel) and on macOS and Windows, but on Linux it
# takes PyPI's CUDA build, which pulls some 3 GB of nvidia-* wheels. So the recipe asks pip what it
# would install, without installing (`--dry-run --report`): when that includes an nvidia-* package,
# torch comes from the PyTorch CPU index, $(TORCH_INDEX), instead (PyTorch's documented CPU
# install; the index also serves torch's dependencies). The question costs one resolution (a
# second or two) and contacts no extra index where the CPU build is at hand, so it stays fast
# here, where download.pytorch.org cannot be reached. TORCH_INDEX=... picks another index (a CUDA
# one, a mirror); the torch version is the one pinned in requirements-dev.txt.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell sed -n 's/^\(torch==[^ #]*\).*/\1/p' requirements-dev.txt)
HAS_NVIDIA = import json, sys; plan = json.load(open(sys.argv[1]))["install"]; \
	sys.exit(0 if any(p["metadata"]["name"].lower().startswith("nvidia-") for p in plan) else 1)

$(STAMP): requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --dry-run --report $(VENV)/torch-plan.json "$(TORCH_PIN)"
	if $(BIN)/python -c '$(HAS_NVIDIA)' $(VENV)/torch-plan.json; then \
	  echo "$(TORCH_PIN): the configured package sources offer a CUDA build; installing the CPU build from $(TORCH_INDEX)"; \
	  $(BIN)/python -m pip install -q "$(TORCH_PIN)" --index-url $(TORCH_INDEX); \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_PIN)"; \
	fi
	rm -f $(VENV)/torch-plan.json
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -c 'import torch; print(f"installed torch {torch.__version__} (CUDA: {torch.version.cuda})")'
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

# `make bench` installs nothing beyond .venv and never overwrites a file: every script writes new
# result files into bench/results/, named by commit and date (with -2, -3, ... when such a name
# is taken, e.g. by a tracked result), and prints their paths. fla-core (the chunk_gsa /
# chunk_gla rows of bench/sweep.py, GPU only) is an explicit step: `make bench-deps` installs it
# into .venv from .whl/ when it is there (make bench-wheels fills it; carry it to an offline GPU
# machine), else from the package index; without it the sweep leaves those rows out and says so.
FLA_WHEELS = fla-core==0.6.0 einops
GPU_SITE ?= /tmp/nstm-site

bench-deps: $(STAMP)
	@echo "bench-deps: installing $(FLA_WHEELS) (--no-deps) into $(VENV), from .whl/ if it has them, else from the package index"
	$(BIN)/python -m pip install -q --no-deps --no-index --find-links .whl $(FLA_WHEELS) || \
	  $(BIN)/python -m pip install -q --no-deps $(FLA_WHEELS)
	@$(BIN)/python -m pip show fla-core einops | grep -E '^(Name|Version|Location)'

bench: $(STAMP)
	@echo "bench: results go to new files in bench/results/ (nothing is overwritten); each script prints where it wrote"
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/cpu_paths.py --out bench/results
	$(BIN)/python bench/cpu.py
	$(BIN)/python bench/flops.py

# The GPU machine runs the benchmarks with its own python and torch (no venv); fla-core comes from
# .whl/ into $(GPU_SITE) with `make bench-gpu-deps`, never as a side effect of bench-gpu.
bench-gpu-deps:
	@echo "bench-gpu-deps: installing $(FLA_WHEELS) (--no-deps) from .whl/ into $(GPU_SITE)"
	$(PY) -m pip install -q --no-deps --no-index --find-links .whl --target $(GPU_SITE) $(FLA_WHEELS)

bench-gpu:
	@echo "bench-gpu: results go to new files in bench/results/; fla rows only after make bench-gpu-deps"
	PYTHONPATH=$(CURDIR):$(GPU_SITE) $(PY) bench/sweep.py
	PYTHONPATH=$(CURDIR):$(GPU_SITE) $(PY) bench/models.py

compile-check: $(STAMP)
	$(BIN)/python bench/compile_check.py --arch 90 80 --dims 64 128

bench-wheels:
	$(PY) -m pip download -q --no-deps -d .whl $(FLA_WHEELS)

data: $(STAMP)
	$(BIN)/python -m nstm.data fetch --root data

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
