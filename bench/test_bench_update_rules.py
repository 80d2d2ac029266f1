"""GXPO bookkeeping per active step (everything but the closures and base-optimizer steps): our flat
ops (Triton on CUDA; C++ on CPU) vs the per-tensor torch implementation, at model-like shapes."""

import pytest
import torch
from per_tensor_gxpo import bookkeeping as per_tensor_bookkeeping
from shapes import CUDA, DEVICE

from gxpo_kernels import backend
from gxpo_kernels.flat import build_groups
from gxpo_kernels.ops import flat_ops
from gxpo_kernels.optim.rule import BLOCK

# (hidden, intermediate, layers, vocab): SmolLM2-135M and Qwen2.5-1.5B parameter shapes; on CPU a 14M
# model with the same layout keeps `make bench` short (the per-tensor path takes ~30 s at 135M there).
MODELS = {"14M": (256, 768, 12, 16384), "135M": (576, 1536, 30, 49152), "1.5B": (1536, 8960, 28, 151936)}
SIZES = ["135M", "1.5B"] if CUDA else ["14M"]
BYTES_PER_PARAM_FP32 = 16 + 4 + 20 + 8  # snapshot r/w, ||g1||, extrapolate, <g0, g~> and ||g~||


def model_shapes(hidden, inter, layers, vocab):
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return [(vocab, hidden)] + per_layer * layers + [(hidden,)]


def ours_bookkeeping(groups, params, g0, g1, gt, K=5, alpha=0.5):
    group = groups[0]
    flat_ops.snapshot(group, g0)
    flat_ops.grad_dots(group, g1, False).tolist()
    flat_ops.extrapolate(group, g1, K=K, alpha=alpha, delta=1e-8).tolist()
    flat_ops.grad_dots(group, gt, True).tolist()


@pytest.mark.parametrize("impl", ["ours", "per_tensor"])
@pytest.mark.parametrize("size", SIZES)
def test_gxpo_bookkeeping(measure, benchmark, impl, size):
    if impl == "ours" and not CUDA and not backend.HAS_CPP:
        pytest.skip("gxpo_kernels._C not built: the CPU comparison is C++ vs per-tensor torch")
    shapes = model_shapes(*MODELS[size])
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda s: torch.randn(s, device=DEVICE, generator=g)  # noqa: E731
    params = [rand(s) for s in shapes]
    g0, g1, gt = ([rand(s) for s in shapes] for _ in range(3))
    n = sum(p.numel() for p in params)
    benchmark.group = f"gxpo bookkeeping {size} model ({n / 1e6:.1f}M fp32 params)"
    benchmark.extra_info["params"] = n
    if impl == "ours":
        groups = build_groups(params, BLOCK)
        benchmark.extra_info["bytes_moved"] = BYTES_PER_PARAM_FP32 * n
        measure(lambda: ours_bookkeeping(groups, params, g0, g1, gt), lambda: (), rounds=5 if CUDA else 3)
    else:
        measure(lambda: per_tensor_bookkeeping(params, g0, g1, gt), lambda: (), rounds=5 if CUDA else 3)
