"""bf16 accuracy and compiled-Triton behaviour on CUDA (skipped without a GPU).

Criterion (as flash-attention's tests): |ours - fp64 ref| <= 2 * |torch bf16 - fp64 ref| + atol,
with errors measured as norms over the whole tensor.
"""

import pytest
import torch
from helpers import loss_batch
from precision_checks import SETTINGS, assert_within_twice_torch, err, fused_linear_vs_torch

from gxpo_kernels import grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("B,T,V", [(4, 256, 32000), (2, 300, 151936)])
def test_grpo_loss_bf16_within_twice_torch_error(B, T, V, loss_agg):
    batch = loss_batch(B, T, V, seed=B + V, device="cuda", dtype=torch.bfloat16)
    args = (batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"])
    ours = batch["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(ours, *args, loss_agg=loss_agg, **SETTINGS)
    loss.backward()

    torch_bf16 = batch["logits"].clone().requires_grad_()
    loss_t, _ = grpo_loss_reference(torch_bf16, *args, loss_agg=loss_agg, **SETTINGS)
    loss_t.backward()

    ref = batch["logits"].double().requires_grad_()
    dbl = [a.double() if a.is_floating_point() else a for a in args]
    loss_r, _ = grpo_loss_reference(ref, *dbl, loss_agg=loss_agg, **SETTINGS)
    loss_r.backward()
    assert err(loss, loss_r) <= 2 * err(loss_t, loss_r) + 1e-6
    assert err(ours.grad, ref.grad) <= 2 * err(torch_bf16.grad, ref.grad) + 1e-6


@pytest.mark.parametrize("impl", ["tiled", "chunked"])
def test_fused_linear_bf16_within_twice_torch_error(impl):
    B, T, H, V = 4, 512, 1536, 32000
    batch = loss_batch(B, T, V, seed=5, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(6)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).bfloat16()
    args = (batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"])
    assert_within_twice_torch(*fused_linear_vs_torch(hidden, weight, args, SETTINGS, impl, torch.bfloat16))


def test_more_than_65535_tokens_in_one_launch():
    B, T, V = 1, 70_000, 64
    batch = loss_batch(B, T, V, seed=7, device="cuda")
    x = batch["logits"].clone().requires_grad_()
    loss, _ = grpo_loss(x, batch["ids"], batch["adv"], batch["mask"], batch["old"])
    loss.backward()
    x64 = batch["logits"].double().requires_grad_()
    loss64, _ = grpo_loss_reference(x64, batch["ids"], batch["adv"].double(), batch["mask"], batch["old"].double())
    loss64.backward()
    assert torch.allclose(loss.double(), loss64, rtol=1e-5)
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 1e-5
