#!/usr/bin/env bash
# Compile-only check of csrc/flat_ops_cuda.cu with nvcc (and of the bindings with c++) against the given python's torch headers, for
# machines with a CUDA toolkit but no GPU (or CPU torch, whose missing generated
# c10/cuda/impl/cuda_cmake_macros.h is stubbed). Usage: gxpo_kernels/optim/flat/csrc/check_cuda_compiles.sh [python] [keep_dir]
# keep_dir: where to keep the object (flat_ops_cuda.o) and ptxas' report (ptxas.log), for `gxpo-bench static`.
set -euo pipefail
PY=${1:-python3}
KEEP=${2:-}
command -v nvcc >/dev/null || { echo "nvcc not found: install a CUDA toolkit to check the CUDA source" >&2; exit 1; }
cd "$(dirname "$0")/.."
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo "#pragma once" > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; \
print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
nvcc_flags=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.COMMON_NVCC_FLAGS))")
abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
nvcc -c csrc/flat_ops_cuda.cu -o "$stub/flat_ops_cuda.o" -I"$stub" $includes -std=c++20 -O3 $nvcc_flags \
  -D_GLIBCXX_USE_CXX11_ABI="$abi" -arch=sm_90 -Xptxas -v > "$stub/log" 2>&1 || { cat "$stub/log" >&2; exit 1; }
grep -v "^ptxas info\|^    [0-9]* bytes stack frame" "$stub/log" || true
if [ -n "$KEEP" ]; then cp "$stub/flat_ops_cuda.o" "$KEEP/flat_ops_cuda.o"; cp "$stub/log" "$KEEP/ptxas.log"; fi
if grep -q "flat_ops_cuda.cu.*warning" "$stub/log"; then echo "warnings in csrc/flat_ops_cuda.cu" >&2; exit 1; fi
# The bindings of csrc/flat_ops.cpp as setup.py's CUDA build sees them.
"${CXX:-c++}" -fsyntax-only -std=c++20 -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$abi" \
  $includes csrc/flat_ops.cpp
echo "csrc/flat_ops_cuda.cu and the WITH_CUDA bindings compile (nvcc $(nvcc --version | grep -o 'release [0-9.]*'), sm_90)"
