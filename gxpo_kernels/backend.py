"""Where a kernel runs: compiled Triton on CUDA tensors; Triton's interpreter on CPU float32 tensors when
TRITON_INTERPRET=1 was set before import (tests); torch ops with the same math otherwise. The update rules'
flat-buffer ops add a C++/CUDA extension to the choice (optim/flat/native.py)."""

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a core dependency
    HAS_TRITON = False

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


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled when `poison_outputs` is on."""
    if poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
