# Two commands, each doing its own setup from a fresh clone:
#   make test    create .venv, install, compile-check the CUDA sources, run every test
#   make bench   create .venv, install with the benchmark extras, write reports/cpu/report.md
#
# TORCH_SPEC pins the CPU build of torch that this project's machines carry.
# With a GPU, install your CUDA build of torch first and reuse it:
#   make test VENV_FLAGS=--system-site-packages TORCH_SPEC=
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS := numpy triton pytest torch_geometric matplotlib pytest-benchmark ruff ninja setuptools wheel
# Peers the tests and the report compare with (pure-Python wheels; no CUDA build).
PEERS := mambapy torchdeq gsplat transformers
NATIVE_SRC := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: test bench setup lint clean gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q $(DEPS) $(PEERS)
	touch $@

# Rebuilt whenever a C++/CUDA source or setup.py changes.
$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SRC)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: setup
	PYTHON=$(PY) bash .ci/nvcc_check.sh
	$(PY) -m pytest tests -q -p no:cacheprovider

# OMP_WAIT_POLICY=passive: torch's OpenMP pool and MKL's threads otherwise spin
# against each other, and whichever provider runs right after the other loses
# 30-50% of its time; passive threads sleep between parallel regions.
bench: setup
	OMP_WAIT_POLICY=passive $(PY) -m frontiers_fast.bench --device cpu

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info frontiers_fast/_C*.so $(VENV)

# The GPU peers' wheels for an offline GPU machine (benchmarks/gpu_check.sh
# installs the ones it lacks): gsplat and the pure-Python packages it imports.
GPU_WHEELS := gsplat==1.5.3 jaxtyping==0.3.11 wadler-lindig rich==15.0.0 markdown-it-py mdurl pygments ninja
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps -d .wheels $(GPU_WHEELS)
