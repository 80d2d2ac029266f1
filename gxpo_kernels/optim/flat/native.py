"""Where the update rules' flat-buffer ops run, and the C++/CUDA extension that can run them.

- CUDA tensors: compiled Triton; GXPO_FLAT_CUDA=csrc picks the CUDA kernels of this package's _C instead
  (csrc/flat_ops_cuda.cu, built by setup.py when torch has CUDA and a CUDA toolkit is found).
- CPU float32 tensors with TRITON_INTERPRET=1 set before import: Triton's interpreter (tests).
- Otherwise on CPU float32/float64: the C++ (OpenMP) extension _C (csrc/flat_ops.cpp) when it was built.
- Anything else: torch ops with the same math (reference.py, ops.py's torch loops).
"""

import os
from contextlib import contextmanager

import torch

from ... import backend

try:
    from . import _C  # noqa: F401

    HAS_CPP = True
except ImportError:
    _C = None
    HAS_CPP = False
HAS_CUDA_CSRC = HAS_CPP and hasattr(_C, "extrapolate_cuda")

FLAT_CUDA_IMPLS = ("triton", "csrc")
FLAT_CUDA = os.environ.get("GXPO_FLAT_CUDA", "triton")
if FLAT_CUDA not in FLAT_CUDA_IMPLS:
    raise ValueError(f"GXPO_FLAT_CUDA={FLAT_CUDA!r}: use 'triton' (default) or 'csrc'")


@contextmanager
def flat_cuda(impl: str):
    """Runs the flat ops on CUDA with `impl` ("triton" or "csrc") inside the block (benchmarks)."""
    global FLAT_CUDA
    if impl not in FLAT_CUDA_IMPLS:
        raise ValueError(f"flat_cuda({impl!r}): use 'triton' or 'csrc'")
    previous, FLAT_CUDA = FLAT_CUDA, impl
    try:
        yield
    finally:
        FLAT_CUDA = previous


def use_cpp(t: torch.Tensor) -> bool:
    return HAS_CPP and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def flat_path(t: torch.Tensor) -> str:
    """Which implementation runs the flat-buffer ops on t: "triton", "cuda_csrc", "cpp" or "torch"."""
    if t.is_cuda and FLAT_CUDA == "csrc" and t.dtype in backend.KERNEL_DTYPES:
        if not HAS_CUDA_CSRC:
            raise RuntimeError("GXPO_FLAT_CUDA=csrc, but gxpo_kernels.optim.flat._C was built without CUDA: "
                               "reinstall with a CUDA toolkit (nvcc) and CUDA torch, or unset GXPO_FLAT_CUDA to "
                               "use Triton")
        return "cuda_csrc"
    if backend.use_triton(t):
        return "triton"
    return "cpp" if use_cpp(t) else "torch"
