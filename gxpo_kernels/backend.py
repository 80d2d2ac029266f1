"""Where a kernel runs: the one place that decides it.

- CUDA tensors: compiled Triton; for the update rules' flat-buffer ops, GXPO_FLAT_CUDA=csrc picks
  the CUDA kernels of gxpo_kernels._C instead (built by setup.py when torch has CUDA and a CUDA
  toolkit is found).
- CPU float32 tensors with TRITON_INTERPRET=1 set before import: Triton's interpreter (tests).
- Otherwise, for the update rules' flat-buffer ops on CPU float32/float64: the C++ (OpenMP)
  extension gxpo_kernels._C when it was built (setup.py).
- Anything else: torch ops with the same math.
"""

import os
from contextlib import contextmanager

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency
    HAS_TRITON = False

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

# Triton reads this when a kernel is decorated, so it is fixed at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this so that every buffer a kernel should fully write starts as NaN.
poison_outputs = False


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


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON or t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and INTERPRET and t.dtype == torch.float32


def use_cpp(t: torch.Tensor) -> bool:
    return HAS_CPP and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def flat_path(t: torch.Tensor) -> str:
    """Which implementation runs the update rules' flat-buffer ops on t: "triton", "cuda_csrc", "cpp"
    or "torch"."""
    if t.is_cuda and FLAT_CUDA == "csrc" and t.dtype in KERNEL_DTYPES:
        if not HAS_CUDA_CSRC:
            raise RuntimeError("GXPO_FLAT_CUDA=csrc, but gxpo_kernels._C was built without CUDA: reinstall with a "
                               "CUDA toolkit (nvcc) and CUDA torch, or unset GXPO_FLAT_CUDA to use Triton")
        return "cuda_csrc"
    if use_triton(t):
        return "triton"
    return "cpp" if use_cpp(t) else "torch"


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled when `poison_outputs` is on."""
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
