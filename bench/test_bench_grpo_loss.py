"""GRPO loss forward+backward: ours vs Liger-Kernel vs torch eager vs torch.compile, side by side
(the implementations are gxpo_bench.kernels', shared with `gxpo-bench kernels`).

On CPU (no interpreter: speed claims exclude it) "ours" is the torch fallback; CUDA runs the kernels.
"""

import pytest
import torch
from shapes import CUDA, DEVICE, DTYPE, LINEAR_SHAPES, LOSS_SHAPES, loss_inputs

from gxpo_bench.kernels import linear_impls, loss_impls

LOSS_IMPLS = loss_impls(CUDA, compile_=True)
LINEAR_IMPLS = linear_impls(compile_=True)


@pytest.mark.parametrize("impl", list(LOSS_IMPLS))
@pytest.mark.parametrize("N,V", LOSS_SHAPES, ids=[f"N{n}-V{v}" for n, v in LOSS_SHAPES])
def test_grpo_loss_fwd_bwd(measure, benchmark, impl, N, V):
    if LOSS_IMPLS[impl] is None:
        pytest.skip("Liger's Triton kernel runs only compiled (CUDA), or liger-kernel is missing")
    benchmark.group = f"grpo_loss N={N} V={V}"
    ids, adv, mask, old, ref = loss_inputs(N, V)
    B, T = ids.shape

    def setup():
        return (torch.randn(B, T + 1, V, device=DEVICE, dtype=DTYPE).requires_grad_(),)

    measure(lambda x: LOSS_IMPLS[impl](x, ids, adv, mask, old, ref).backward(), setup)


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
@pytest.mark.parametrize("N,H,V", LINEAR_SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in LINEAR_SHAPES])
def test_fused_linear_grpo_loss_fwd_bwd(measure, benchmark, impl, N, H, V):
    if LINEAR_IMPLS[impl] is None:
        pytest.skip("liger-kernel is not installed")
    benchmark.group = f"fused_linear_grpo_loss N={N} H={H} V={V}"
    ids, adv, mask, old, ref = loss_inputs(N, V)
    B, T = ids.shape
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(DTYPE).requires_grad_()

    def setup():
        weight.grad = None
        return (torch.randn(B, T, H, device=DEVICE, dtype=DTYPE).requires_grad_(), weight)

    measure(lambda h, w: LINEAR_IMPLS[impl](h, w, ids, adv, mask, old, ref).backward(), setup)
