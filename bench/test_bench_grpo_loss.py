"""GRPO loss forward+backward: ours vs Liger-Kernel vs torch eager vs torch.compile, side by side.

On CPU (no interpreter: speed claims exclude it) "ours" is the torch fallback; CUDA runs the kernels.
"""

import pytest
import torch
from shapes import CUDA, DEVICE, DTYPE, LINEAR_SHAPES, LOSS_SHAPES, loss_inputs

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.ops.reference import grpo_loss_reference

KW = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "temperature": 1.0}
compiled_reference = torch.compile(grpo_loss_reference, dynamic=False)


def liger_triton(logits, ids, adv, mask, old, ref):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    # Liger scores logits[:, :-1]; give it the causal LM's [B, T + 1, V] view.
    return triton_grpo_loss(logits, old, ref, ids, adv, mask.float(), temperature=KW["temperature"],
                            beta=KW["beta"], eps_low=KW["eps_low"], eps_high=KW["eps_high"], inplace=True,
                            loss_type="dapo", reduce=True)[0]


LOSS_IMPLS = {
    "ours": lambda x, *a: grpo_loss(x[:, :-1], *a, **KW, inplace=True)[0],
    "ours_not_inplace": lambda x, *a: grpo_loss(x[:, :-1], *a, **KW)[0],
    "liger": liger_triton,
    "torch_eager": lambda x, *a: grpo_loss_reference(x[:, :-1], *a, **KW)[0],
    "torch_compile": lambda x, *a: compiled_reference(x[:, :-1], *a, **KW)[0],
}


@pytest.mark.parametrize("impl", list(LOSS_IMPLS))
@pytest.mark.parametrize("N,V", LOSS_SHAPES, ids=[f"N{n}-V{v}" for n, v in LOSS_SHAPES])
def test_grpo_loss_fwd_bwd(measure, benchmark, impl, N, V):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
        if not CUDA:
            pytest.skip("Liger's Triton kernel runs only compiled (CUDA); the interpreter is not timed")
    benchmark.group = f"grpo_loss N={N} V={V}"
    ids, adv, mask, old, ref = loss_inputs(N, V)
    B, T = ids.shape

    def setup():
        return (torch.randn(B, T + 1, V, device=DEVICE, dtype=DTYPE).requires_grad_(),)

    measure(lambda x: LOSS_IMPLS[impl](x, ids, adv, mask, old, ref).backward(), setup)


def liger_fused(hidden, weight, ids, adv, mask, old, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=KW["beta"], compiled=True, epsilon_low=KW["eps_low"],
                                    epsilon_high=KW["eps_high"], temperature=KW["temperature"], loss_type="dapo")
    out = loss(hidden, weight, ids, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
    return out[0] if isinstance(out, tuple) else out


LINEAR_IMPLS = {
    "ours": lambda h, w, *a: fused_linear_grpo_loss(h, w, *a, **KW)[0],
    "ours_materialized": lambda h, w, *a: grpo_loss(h @ w.t(), *a, **KW, inplace=True)[0],
    "liger": liger_fused,
    "torch_eager": lambda h, w, *a: grpo_loss_reference(h @ w.t(), *a, **KW)[0],
    "torch_compile": lambda h, w, *a: compiled_reference(h @ w.t(), *a, **KW)[0],
}


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
@pytest.mark.parametrize("N,H,V", LINEAR_SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in LINEAR_SHAPES])
def test_fused_linear_grpo_loss_fwd_bwd(measure, benchmark, impl, N, H, V):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    benchmark.group = f"fused_linear_grpo_loss N={N} H={H} V={V}"
    ids, adv, mask, old, ref = loss_inputs(N, V)
    B, T = ids.shape
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(DTYPE).requires_grad_()

    def setup():
        weight.grad = None
        return (torch.randn(B, T, H, device=DEVICE, dtype=DTYPE).requires_grad_(), weight)

    measure(lambda h, w: LINEAR_IMPLS[impl](h, w, ids, adv, mask, old, ref).backward(), setup)
