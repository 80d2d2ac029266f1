"""Where a kernel runs: the one place that decides it.

- CUDA tensors: compiled Triton.
- CPU float32 tensors with TRITON_INTERPRET=1 set before import: Triton's interpreter (tests).
- Otherwise, for the update rules' flat-buffer ops on CPU float32/float64: the C++ (OpenMP)
  extension gxpo_kernels._C when it was built (setup.py).
- Anything else: torch ops with the same math.
"""

import os

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

# Triton reads this when a kernel is decorated, so it is fixed at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this so that every buffer a kernel should fully write starts as NaN.
poison_outputs = False


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON or t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and INTERPRET and t.dtype == torch.float32


def use_cpp(t: torch.Tensor) -> bool:
    return HAS_CPP and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def flat_path(t: torch.Tensor) -> str:
    """Which implementation runs the update rules' flat-buffer ops on t: "triton", "cpp" or "torch"."""
    if use_triton(t):
        return "triton"
    return "cpp" if use_cpp(t) else "torch"


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled when `poison_outputs` is on."""
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
