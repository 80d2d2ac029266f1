"""The loss where the ratio overflows: zero-advantage tokens stay exactly 0 (never inf * 0 = NaN) on
the Triton and torch paths alike, and verl's log-ratio clamp, against the float64 reference."""

import pytest
import torch
from helpers import loss_batch, loss_close, rel_err

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference
from gxpo_kernels.loss.settings import LOSS_AGGS


def _overflowing_batch(seed, B=4, T=6, V=37, offset=100.0):
    """Every other completion has zero advantage and old log-probs `offset` below the policy's, so its
    ratio is exp(offset): inf in fp32 for offset > 88.7."""
    batch = loss_batch(B, T, V, seed=seed, with_ref=False)
    batch["adv"][::2] = 0.0
    logp = torch.log_softmax(batch["logits"].double(), -1).gather(-1, batch["ids"][..., None]).squeeze(-1)
    batch["old"][::2] = (logp[::2] - offset).float()
    return batch


def _run(batch, **kw):
    x = batch["logits"].clone().requires_grad_()
    loss, metrics = grpo_loss(x, batch["ids"], batch["adv"], batch["mask"], batch["old"], **kw)
    loss.backward()
    return loss, metrics, x.grad


def _reference(batch, **kw):
    x64 = batch["logits"].double().requires_grad_()
    loss64, _ = grpo_loss_reference(x64, batch["ids"], batch["adv"].double(), batch["mask"],
                                    batch["old"].double(), **kw)
    loss64.backward()
    return loss64, x64.grad


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
def test_zero_advantage_token_with_overflowing_ratio_is_zero(path, loss_agg, dual_clip_c):
    batch = _overflowing_batch(seed=11)
    kw = {"loss_agg": loss_agg, "max_completion_len": 9, "dual_clip_c": dual_clip_c}
    loss, metrics, grad = _run(batch, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert not torch.isfinite(metrics["ratio_mean"]), "the fp32 ratio did overflow (the case under test)"
    assert grad[::2].abs().max() == 0, "zero-advantage rows get no gradient"
    loss64, grad64 = _reference(batch, **kw)
    assert loss_close(loss, loss64)
    assert rel_err(grad, grad64) < 1e-5


def test_reference_is_finite_past_float64_overflow():
    batch = _overflowing_batch(seed=12, offset=800.0)  # exp(800) overflows float64 too
    loss64, grad64 = _reference(batch)
    assert torch.isfinite(loss64) and torch.isfinite(grad64).all()
    assert grad64[::2].abs().max() == 0


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_log_ratio_clamp_matches_reference(path, loss_agg):
    batch = loss_batch(5, 7, 41, seed=13, with_ref=False)
    batch["old"][:, ::2] -= 3.0  # log-ratios beyond the clamp, both signs
    batch["old"][:, 1::3] += 3.0
    kw = {"loss_agg": loss_agg, "max_completion_len": 10, "log_ratio_clamp": 2.0, "eps_high": 0.28}
    loss, metrics, grad = _run(batch, **kw)
    loss64, grad64 = _reference(batch, **kw)
    assert loss_close(loss, loss64)
    assert rel_err(grad, grad64) < 1e-5
    unclamped_loss, _, unclamped_grad = _run(batch, **{**kw, "log_ratio_clamp": None})
    assert not loss_close(unclamped_loss, loss64) or rel_err(unclamped_grad, grad64) > 1e-3, \
        "the clamp must bind on this batch"


def test_log_ratio_clamp_on_the_fused_linear_loss(path):
    g = torch.Generator().manual_seed(14)
    B, T, H, V = 3, 5, 16, 29
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + torch.tensor([-4.0, 4.0, 100.0], dtype=torch.float64)[:, None]
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, w, ids, adv.float(), mask, old.float(), log_ratio_clamp=2.5)
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss64, _ = grpo_loss_reference(h64 @ w64.T, ids[:, :], adv, mask, old, log_ratio_clamp=2.5)
    loss64.backward()
    assert loss_close(loss, loss64)
    assert rel_err(h.grad, h64.grad) < 1e-5 and rel_err(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_log_ratio_clamp_must_be_positive(bad):
    batch = loss_batch(2, 3, 5, seed=15, with_ref=False)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        grpo_loss(batch["logits"], batch["ids"], batch["adv"], batch["mask"], batch["old"], log_ratio_clamp=bad)
