"""gxpo_kernels.optim.retention against the GXPO authors' functions, transcribed here from their files
(github SwapniL-afk-now/final-gxpo: Code/SFPO/verl/workers/actor/gxpo_state.py at d2afd2cf, the AdamW
direction and both retention scales; dp_actor.py at 1a301e16, the reposition), on fresh float64 inputs to
1e-10, and their own test file's cases (tests/gxpo/test_gxpo_adamw_direction.py at d2afd2cf)."""

import math

import pytest
import torch

from gxpo_kernels.optim import retention

K, DELTA = 10, 1e-8


def theirs_geometric_sum_horner(r, K):
    x = torch.ones_like(r)
    for _ in range(K - 1):
        x = x * r + 1
    return x


def theirs_coordinatewise(den, num, K, delta, den_scale=1.0, num_scale=1.0, den_rms=None):
    work = torch.float64 if torch.float64 in (den.dtype, num.dtype) else torch.float32
    den_work, num_work = den.to(work), num.to(work)
    if den_rms is None:
        den_rms = den_work.square().mean().sqrt()
    threshold = den_rms * 1e-3
    active = den_work.abs() > threshold
    safe_den = torch.where(active, den_work * den_scale, torch.ones_like(den_work))
    candidate = (num_work * num_scale) / safe_den
    finite = torch.isfinite(candidate)
    ratio_clipped = active & ((~finite) | (candidate < -2.0) | (candidate > 3.0))
    candidate.clamp_(-2.0, 3.0).nan_to_num_(nan=1.0)
    ratio = torch.where(active, candidate, torch.ones_like(candidate))
    s_k = theirs_geometric_sum_horner(ratio, K)
    s_2 = theirs_geometric_sum_horner(ratio, 2)
    active_scale = torch.where(s_2.abs() > delta, s_k / s_2, torch.ones_like(s_2))
    active_scale = active_scale.nan_to_num(nan=1.0, posinf=1.0, neginf=1.0)
    active_scale.clamp_(1.0, K / 2.0 + 1.0)
    scale = torch.where(active, active_scale, torch.ones_like(active_scale))
    return ratio, scale, active, ratio_clipped


def theirs_adamw_direction(before, after, lr, weight_decay):
    work = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    c = 1.0 - lr * weight_decay
    return (before.to(work) * c - after.to(work)) / lr


def theirs_adamw_direction_from_step(before, step, lr, weight_decay):
    work = torch.float64 if torch.float64 in (before.dtype, step.dtype) else torch.float32
    return -(step.to(work) / lr) - before.to(work) * weight_decay


def theirs_update_scale(cross, self_dot, K, delta):
    safe = self_dot > 0
    rho = torch.where(safe, cross / torch.where(safe, self_dot, torch.ones_like(self_dot)), torch.zeros_like(cross))
    rho = rho.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0)
    s_k = theirs_geometric_sum_horner(rho, K)
    s_2 = 1 + rho
    scale = torch.where(s_2.abs() > delta, s_k / s_2, torch.ones_like(rho))
    scale = scale.nan_to_num(nan=1.0, posinf=1.0, neginf=1.0).clamp(0.0, K / 2.0 + 1.0)
    return rho, scale


def theirs_reposition(t0, theta2, scale, alpha, min_eff):
    disp2 = theta2 - t0
    eff = scale * alpha
    if min_eff > 0.0:
        eff = eff.clamp(min=min_eff)
    return disp2 * eff + t0


def _close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


def _inputs(seed, n=3000):
    g = torch.Generator().manual_seed(seed)
    den = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-6, 1, n, dtype=torch.float64)
    num = den * (1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) + 1e-3 * torch.randn(
        n, generator=g, dtype=torch.float64)
    num[::97] = -3 * den[::97]  # ratios beyond the clamp
    return den, num


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_coordinatewise_retention_equals_theirs(seed, k):
    den, num = _inputs(seed)
    _close(retention.coordinatewise_retention(den, num, k, DELTA),
           theirs_coordinatewise(den, num, k, DELTA))
    # the gradient space: clip multipliers, and the RMS of the whole tensor (all shards) given
    rms = den.square().mean().sqrt() * 1.7
    _close(retention.coordinatewise_retention(den, num, k, DELTA, den_scale=0.31, num_scale=0.77, den_rms=rms),
           theirs_coordinatewise(den, num, k, DELTA, den_scale=0.31, num_scale=0.77, den_rms=rms))


def test_their_edge_cases():
    """Their test: d0 = [1, 0, 1e-12, -1, 1, 1, 2], d1 = [2, 5, 5, -2, nan, inf, 0]."""
    d0 = torch.tensor([1.0, 0.0, 1e-12, -1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    d1 = torch.tensor([2.0, 5.0, 5.0, -2.0, math.nan, math.inf, 0.0], dtype=torch.float64)
    ratio, scale, active, clipped = retention.coordinatewise_retention(d0, d1, K, DELTA)
    assert active.tolist() == [True, False, False, True, True, True, True]
    assert ratio[1] == ratio[2] == scale[1] == scale[2] == 1  # inactive: neutral
    assert ratio[4] == 1 and ratio[5] == 3 and clipped[4] and clipped[5] and not clipped[0]
    assert ((scale >= 1) & (scale <= K / 2 + 1)).all()
    assert scale[0] == K / 2 + 1  # r = 2: S_10(2) / 3 = 341, clamped to 6
    assert scale[6] == 1  # r = 0: S_K / S_2 = 1


def test_adamw_direction_is_what_torch_adamw_applied():
    """Their identity, in float64 over 4 steps: ((1 - lr wd) theta_t - theta_{t+1}) / lr = m_hat / (sqrt(v_hat) +
    eps); and the step form equals the two-point form."""
    lr, wd, betas, eps = 3e-3, 0.04, (0.9, 0.999), 1e-8
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(257, generator=g, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd, betas=betas, eps=eps)
    for _ in range(4):
        p.grad = torch.randn(257, generator=g, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        state = opt.state[p]
        k = state["step"].item()
        expected = (state["exp_avg"] / (1 - betas[0] ** k)) / (
            (state["exp_avg_sq"] / (1 - betas[1] ** k)).sqrt() + eps)
        d = retention.adamw_direction(before, p.detach(), lr, wd)
        torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d, theirs_adamw_direction(before, p.detach(), lr, wd), rtol=1e-12, atol=0)
        step_form = retention.adamw_direction_from_step(before, p.detach() - before, lr, wd)
        torch.testing.assert_close(step_form, theirs_adamw_direction_from_step(before, p.detach() - before, lr, wd),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(step_form, d, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="lr must be > 0"):
        retention.adamw_direction(before, before, 0.0, wd)


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_update_space_retention_equals_theirs(k):
    g = torch.Generator().manual_seed(k)
    cases = [(torch.randn((), generator=g, dtype=torch.float64), torch.rand((), generator=g, dtype=torch.float64))
             for _ in range(200)]
    cases += [(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))
              for x, y in ((0.0, 0.0), (3.0, 0.0), (5.0, 1.0), (-5.0, 1.0), (-1.0, 1.0), (1.0, 1.0), (math.nan, 1.0))]
    for cross, self_dot in cases:
        _close(retention.update_space_retention(cross, self_dot, k, DELTA),
               theirs_update_scale(cross, self_dot, k, DELTA))
    rho, scale = retention.update_space_retention(torch.tensor(0.0), torch.tensor(0.0), k)
    assert rho == 0 and scale == 1  # u0 vanished: neutral
    rho, scale = retention.update_space_retention(torch.tensor(1.0), torch.tensor(1.0), k)
    assert rho == 1 and scale == pytest.approx(k / 2)
    rho, scale = retention.update_space_retention(torch.tensor(-1.0), torch.tensor(1.0), k)
    assert rho == -1 and scale == 1  # S_2 = 0: the delta guard


@pytest.mark.parametrize("min_eff", [0.0, 0.9])
def test_reposition_equals_theirs(min_eff):
    den, num = _inputs(7)
    theta0 = torch.randn_like(den)
    theta2 = theta0 + 1e-3 * torch.randn_like(den)
    _, scale, _, _ = retention.coordinatewise_retention(den, num, 3, DELTA)
    ours = retention.reposition(theta0, theta2, scale, 0.8, min_eff)
    torch.testing.assert_close(ours, theirs_reposition(theta0, theta2, scale, 0.8, min_eff), rtol=1e-12, atol=0)
    if min_eff:  # inactive coordinates (scale 1) move by max(alpha, min_eff) = 0.9, not alpha
        torch.testing.assert_close((ours - theta0)[scale == 1], 0.9 * (theta2 - theta0)[scale == 1])
