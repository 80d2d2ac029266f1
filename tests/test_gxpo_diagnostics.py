"""GXPO's reposition diagnostics (the authors' effective multiplier, contracting flag, dispK / disp2, retention
kind, tensors per family, clip multipliers) against the scales the step applied, captured at the reposition in
float64."""

import math

import pytest
import torch

from gxpo_kernels import GXPO, FlatAdamW
from gxpo_kernels.optim import retention_step
from gxpo_kernels.optim.retention_step import RETENTION_KINDS


def problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).to(dtype)
    x, y = torch.randn(32, 7).to(dtype), torch.randn(32, 4).to(dtype)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, closure


@pytest.mark.parametrize("space,alpha,min_eff,clip", [("update", 0.8, 0.0, None), ("update", 0.3, 0.0, 0.05),
                                                      ("grad", 0.3, 0.2, 0.05), ("update", 0.3, 0.9, None)])
def test_reposition_stats_from_the_applied_scales(monkeypatch, space, alpha, min_eff, clip):
    captured = []
    original = retention_step.reposition

    def spy(theta0, theta2, scale, alpha_, min_eff_=0.0):
        captured.append((theta0.clone(), theta2.clone(), torch.as_tensor(scale).expand_as(theta0).clone()))
        return original(theta0, theta2, scale, alpha_, min_eff_)

    monkeypatch.setattr(retention_step, "reposition", spy)
    model, closure = problem()
    opt = GXPO(model.parameters(), lr=3e-2, weight_decay=1e-2, gate="never", retention_space=space, K=5,
               alpha=alpha, min_effective_multiplier=min_eff, max_grad_norm=clip)
    for _ in range(2):
        captured.clear()
        opt.step(closure)
    stats = opt.last_stats
    scales = torch.cat([s.flatten() for *_, s in captured])
    disp2 = torch.cat([(t2 - t0).flatten() for t0, t2, _ in captured])
    assert scales.numel() == sum(p.numel() for p in model.parameters())
    eff = (alpha * scales).clamp(min=min_eff)
    if min_eff <= alpha:
        assert stats["effective_multiplier"] == pytest.approx(eff.mean().item(), rel=1e-12)
        assert stats["contracting"] == float(eff.mean().item() < 1.0)
    else:  # a floor above alpha: the statistics do not give the mean of the floored multipliers, so no key
        assert "effective_multiplier" not in stats and "contracting" not in stats
    assert stats["dispK_over_disp2"] == pytest.approx(((scales * disp2).norm() / disp2.norm()).item(), rel=1e-9)
    kind = "adamw_direction" if space == "update" else "gradient"
    assert stats["retention_kind"] == RETENTION_KINDS[kind]
    family = "n_params_adamw" if space == "update" else "n_params_grad"
    other = ({"n_params_adamw", "n_params_grad"} - {family}).pop()
    assert (stats[family], stats[other], stats["n_params_muon"]) == (4.0, 0.0, 0.0)
    g0_norm, g1_norm = stats["g0_norm"], stats["g1_norm"]
    c = (lambda n: 1.0 if clip is None else min(1.0, clip / (n + 1e-12)))
    assert (stats["clip_scale_g0"], stats["clip_scale_g1"]) == (c(g0_norm), c(g1_norm))
    assert clip is None or stats["clip_scale_g0"] < 1.0


def test_contracting_flags_a_mean_multiplier_below_one():
    """alpha 0.3 with K = 3 (scale at most 2.5): every coordinate moves less than theta2 - theta0, contracting; alpha
    1 cannot contract (scale >= 1)."""
    for alpha, want in ((0.3, 1.0), (1.0, 0.0)):
        model, closure = problem()
        opt = GXPO(model.parameters(), lr=3e-2, gate="never", K=3, alpha=alpha)
        opt.step(closure)
        assert opt.last_stats["contracting"] == want
        assert math.isfinite(opt.last_stats["effective_multiplier"])


def test_fused_path_reports_the_same_diagnostics():
    """The FlatAdamW launches (float32, the interpreter) give the diagnostics the unfused float64 path gives."""
    keys = ("effective_multiplier", "contracting", "dispK_over_disp2", "retention_kind", "n_params_adamw",
            "clip_scale_g0", "clip_scale_g1")
    results = []
    for base, dtype in ((FlatAdamW, torch.float32), (torch.optim.AdamW, torch.float64)):
        model, closure = problem(dtype)
        opt = GXPO(model.parameters(), base=base, lr=3e-2, gate="never", K=5, alpha=0.3, max_grad_norm=0.05)
        opt.step(closure)
        assert opt._fused_base() == (base is FlatAdamW)
        results.append(opt.last_stats)
    for key in keys:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4), key
