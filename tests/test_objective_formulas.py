"""policy_loss against each objective written from its paper's formula (tests/objective_formulas.py), float64: loss
and gradient, on ragged masks with an empty completion, zero advantages, and log-ratios far outside the clip
(ratios of e^+-30)."""

import zlib

import pytest
import torch
from objective_formulas import formula_k3_kl, formula_loss

from gxpo_kernels.loss.objectives import PolicyObjective, policy_loss

B, T = 5, 9


def inputs(seed, spread):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 0  # an empty completion
    mask[1, :] = 1
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0  # a zero-advantage completion
    return logp, old, adv, mask


CASES = [(t, "token") for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")]
CASES += [(t, "sequence") for t in ("grpo", "dapo", "luspo")]


@pytest.mark.parametrize("spread", [0.1, 30.0])
@pytest.mark.parametrize("loss_type,level", CASES)
def test_each_objective_is_its_papers_formula(loss_type, level, spread):
    logp0, old, adv, mask = inputs(zlib.crc32(f"{loss_type}-{level}".encode()) % 1000, spread)
    delta = 1.4 if loss_type in ("grpo", "dapo") else None
    obj = PolicyObjective(loss_type=loss_type, importance_sampling_level=level, epsilon_high=5.0
                          if loss_type == "cispo" else 0.28, delta=delta, max_completion_length=T + 3)
    logp = logp0.clone().requires_grad_()
    loss, _ = policy_loss(obj, logp, torch.zeros_like(logp), adv, mask, old)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = logp0.clone().requires_grad_()
    want = formula_loss(loss_type, ref_logp, old, adv, mask, level=level, eps_high=obj.eps_high, delta=delta,
                        max_len=T + 3)
    (want_grad,) = torch.autograd.grad(want, ref_logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert not grad[0].any() and not grad[mask == 0].any()  # the empty completion and padding take no gradient
    if loss_type != "sapo":  # a zero advantage: no policy gradient (SAPO's gate is 0 too)
        assert not grad[2].any()


def test_k3_kl_is_schulmans_estimator():
    logp0, old, adv, mask = inputs(3, 0.2)
    ref = logp0 + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    obj = PolicyObjective(loss_type="bnpo", beta=1.0, use_bias_correction_kl=False)
    _, metrics = policy_loss(obj, logp0.clone(), torch.zeros_like(logp0), adv, mask, old, ref)
    torch.testing.assert_close(metrics["kl"], formula_k3_kl(logp0, ref, mask), rtol=1e-12, atol=1e-14)
