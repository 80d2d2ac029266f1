"""GXPO bookkeeping per active step (everything but the closures and base-optimizer steps): our flat
ops (Triton on CUDA, and csrc's CUDA kernels; C++ on CPU) vs the per-tensor torch implementation, at
model-like shapes."""

import pytest
import torch
from shapes import CUDA, DEVICE, MODELS, SIZES, model_shapes

from gxpo_bench.kernels import BOOKKEEPING_BYTES_PER_PARAM, csrc_cuda_bookkeeping, ours_bookkeeping
from gxpo_bench.per_tensor import bookkeeping as per_tensor_bookkeeping
from gxpo_kernels import backend
from gxpo_kernels.flat import build_groups
from gxpo_kernels.optim.lookahead import BLOCK


@pytest.mark.parametrize("impl", ["ours", "csrc_cuda", "per_tensor"])
@pytest.mark.parametrize("size", SIZES)
def test_gxpo_bookkeeping(measure, benchmark, impl, size):
    if impl == "ours" and not CUDA and not backend.HAS_CPP:
        pytest.skip("gxpo_kernels._C not built: the CPU comparison is C++ vs per-tensor torch")
    if impl == "csrc_cuda" and not (CUDA and backend.HAS_CUDA_CSRC):
        pytest.skip("needs CUDA and gxpo_kernels._C built with its CUDA kernels")
    shapes = model_shapes(*MODELS[size])
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda s: torch.randn(s, device=DEVICE, generator=g)  # noqa: E731
    params = [rand(s) for s in shapes]
    g0, g1, gt = ([rand(s) for s in shapes] for _ in range(3))
    n = sum(p.numel() for p in params)
    benchmark.group = f"gxpo bookkeeping {size} model ({n / 1e6:.1f}M fp32 params)"
    benchmark.extra_info["params"] = n
    if impl != "per_tensor":
        groups = build_groups(params, BLOCK)
        benchmark.extra_info["bytes_moved"] = BOOKKEEPING_BYTES_PER_PARAM * n
        run = ours_bookkeeping if impl == "ours" else csrc_cuda_bookkeeping
        measure(lambda: run(groups, g0, g1, gt), lambda: (), rounds=5 if CUDA else 3)
    else:
        measure(lambda: per_tensor_bookkeeping(params, g0, g1, gt), lambda: (), rounds=5 if CUDA else 3)
