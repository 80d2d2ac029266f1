"""GXPO's retention in its authors' current spaces fused into FlatAdamW's two launches (the interpreter on CPU,
float32) against the unfused path (torch's AdamW, then optim/retention_step.py) run in float64 on a copy of the
same model, which tests/test_gxpo_authors_step.py checks against the authors' step to 1e-10."""

import copy

import pytest
import torch

from gxpo_kernels import GXPO, FlatAdamW
from gxpo_kernels.optim.flat.adamw_kernel import Retention, adamw_step
from gxpo_kernels.optim.flat.buffers import BLOCK, FlatGroup

STEPS = 4
COMPARED_STATS = ("g0_norm", "g1_norm", "gtilde_norm", "cos_g0_g1", "cos_g0_gtilde", "r_mean", "r_std",
                  "scale_mean", "scale_max", "r_mean_active", "scale_mean_active", "step_norm", "scaled_step_norm")


def problem(seed):
    torch.manual_seed(seed)
    # a matrix of 2 full blocks and a tail, a small one, biases: per-tensor thresholds that differ in scale
    model = torch.nn.Sequential(torch.nn.Linear(41, 53), torch.nn.Tanh(), torch.nn.Linear(53, 5))
    with torch.no_grad():
        model[2].weight.mul_(30.0)  # its gradients' RMS far from the first layer's
    x, y = torch.randn(24, 41), torch.randn(24, 5)
    return model, x, y


def run(model, x, y, base, **kwargs):
    opt = GXPO(model.parameters(), base=base, lr=3e-2, weight_decay=1e-2, gate="never", **kwargs)
    stats = []
    for step in range(STEPS):
        rows = torch.randperm(24, generator=torch.Generator().manual_seed(step))[:16]

        def closure(rows=rows):
            loss = torch.nn.functional.mse_loss(model(x[rows].to(model[0].weight.dtype)),
                                                y[rows].to(model[0].weight.dtype))
            loss.backward()
            return loss

        opt.step(closure)
        stats.append(dict(opt.last_stats))
    return opt, stats


CASES = [
    {"retention_space": "update", "optimizer_state": "transactional", "K": 3, "alpha": 0.8},
    {"retention_space": "update", "optimizer_state": "accumulate", "K": 5, "alpha": 0.3, "max_grad_norm": 0.05},
    {"retention_space": "update", "optimizer_state": "transactional_fast_state", "K": 10, "alpha": 0.3,
     "min_effective_multiplier": 0.6},
    {"retention_space": "grad", "optimizer_state": "transactional", "K": 10, "alpha": 0.3, "max_grad_norm": 0.05},
    {"retention_space": "grad", "optimizer_state": "accumulate", "K": 3, "alpha": 0.8},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_fused_spaces_match_the_unfused_float64_step(kwargs):
    model, x, y = problem(0)
    ref_model = copy.deepcopy(model).double()
    start = [p.detach().double().clone() for p in ref_model.parameters()]
    opt, stats = run(model, x, y, FlatAdamW, preset="authors-1p5b", **kwargs)
    assert opt._fused_base()
    ref_opt, ref_stats = run(ref_model, x.double(), y.double(), torch.optim.AdamW, preset="authors-1p5b", **kwargs)
    # the displacements over STEPS steps; K = 10's degree-9 scale polynomial amplifies float32 rounding
    moved = max((q.detach() - q0).abs().max().item() for q, q0 in zip(ref_model.parameters(), start, strict=True))
    for p, q, q0 in zip(model.parameters(), ref_model.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach().double() - q0, q.detach() - q0, rtol=1e-3, atol=5e-4 * moved)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):  # AdamW's moments too
        for key in ("exp_avg", "exp_avg_sq"):
            want = ref_opt.base.state[q][key]
            torch.testing.assert_close(opt.base.state[p][key].double(), want, rtol=1e-4,
                                       atol=1e-4 * want.abs().max().item())
        assert float(opt.base.state[p]["step"]) == float(ref_opt.base.state[q]["step"])
    n_total = sum(p.numel() for p in model.parameters())
    for got, want in zip(stats, ref_stats, strict=True):
        assert got["fallback"] == want["fallback"] == 0.0
        for key in COMPARED_STATS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        # a coordinate at its threshold may flip between float32 and float64: at most one
        assert abs(got["inactive_frac"] - want["inactive_frac"]) * n_total <= 1.0
        assert abs(got["ratio_clip_frac"] - want["ratio_clip_frac"]) * n_total * (1 - got["inactive_frac"]) <= 1.0
    assert 0.0 < stats[-1]["inactive_frac"] < 1.0  # the thresholds bite, and not everywhere


@pytest.mark.parametrize("space", ["update", "grad"])
def test_thresholds_are_per_tensor_rms_of_the_denominator(space, monkeypatch):
    """Pass 2's thresholds: 1e-3 RMS of each tensor's own g0 (grad) or d0 (update: the direction pass 1's
    moments give), as the pass-1 snapshot and AdamW's state hold them when pass 2 starts."""
    from gxpo_kernels.optim import fused_retention

    model, x, y = problem(1)
    seen = []
    original = fused_retention.pass2

    def spy(groups, *args, **kwargs):
        out = original(groups, *args, **kwargs)
        (group,), opt = groups, spy.opt
        want = []
        for i, p in enumerate(group.params):
            if space == "grad":
                den = group.view(group.g0, i).double()
            else:
                state, (beta1, beta2) = opt.base.state[p], opt.base.param_groups[0]["betas"]
                step = float(state["step"])
                den = (state["exp_avg"].double() / (1 - beta1**step)
                       / (state["exp_avg_sq"].double().sqrt() / (1 - beta2**step) ** 0.5 + 1e-8))
            want.append(1e-3 * den.square().mean().sqrt())
        seen.append((out[0].thresholds.double(), torch.stack(want)))
        return out

    monkeypatch.setattr(fused_retention, "pass2", spy)
    spy.opt = GXPO(model.parameters(), base=FlatAdamW, lr=3e-2, gate="never", preset="authors-1p5b",
                   retention_space=space)
    for _ in range(2):
        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        spy.opt.step(closure)
    assert len(seen) == 2
    for got, want in seen:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    if space == "grad":  # the tensors' gradient scales differ: one threshold for all would be wrong
        assert seen[0][1].max() > 5 * seen[0][1].min()


@pytest.mark.parametrize("space", ["update", "grad"])
def test_pass1_sums_of_squares_and_unwritten_blocks(space):
    """Pass 1's per-tensor sums of squares of the ratio's denominator (the raw gradient, or AdamW's direction)
    over ragged tensors, a parameter without a gradient and every block written (outputs are poisoned)."""
    torch.manual_seed(3)
    numels = (3000, 1024, 7, 0, 1500)
    params = [torch.randn(n) for n in numels]
    grads = [torch.randn(n) * (i + 1) if i != 2 else None for i, n in enumerate(numels)]
    ms, vs = [torch.randn(n) * 0.1 for n in numels], [torch.rand(n) * 0.01 for n in numels]
    ref = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(params, ms, vs, strict=True)]
    group = FlatGroup(params, BLOCK)
    n = len(numels)
    lr, wd, beta1, beta2, eps, step = 1e-2, 0.1, 0.9, 0.99, 1e-8, 3
    bc1, bc2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
    ms_, vs_ = ([t if g is not None else None for t, g in zip(ts, grads, strict=True)] for ts in (ms, vs))
    den_sq = adamw_step(group, grads, ms_, vs_, [lr] * n, [wd] * n, [bc1] * n, [bc2_sqrt] * n, beta1=beta1,
                        beta2=beta2, eps=eps, grad_scale=0.5, snapshot=True, retention=Retention(space))
    for i, (p0, m0, v0) in enumerate(ref):
        g = grads[i]
        if g is None:
            assert den_sq[i] == 0
            continue
        gd, m0, v0 = g.double() * 0.5, m0.double(), v0.double()
        m1 = m0 + (1 - beta1) * (gd - m0)
        v1 = beta2 * v0 + (1 - beta2) * gd * gd
        den = m1 / bc1 / (v1.sqrt() / bc2_sqrt + eps) if space == "update" else g.double()
        assert den_sq[i].item() == pytest.approx(den.square().sum().item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(group.view(group.g0, i), g)  # the snapshot keeps the raw g0
        torch.testing.assert_close(group.view(group.theta0, i), p0)


@pytest.mark.parametrize("space", ["update", "grad"])
def test_the_thresholds_read_the_all_reduced_sums(space, monkeypatch):
    """pass2 takes RMS from the all-reduced sums of squares and counts (here another 'rank' holding sums 1e12
    times larger): every local coordinate falls under its threshold and moves by alpha."""
    from gxpo_kernels.optim import fused_retention

    original = fused_retention.pass2

    def huge_other_shard(groups, space_, den_sq, all_reduce, **kwargs):
        n = sum(len(g.params) for g in groups)
        factor = torch.cat([torch.full((n,), 1e12, dtype=torch.float64), torch.ones(n, dtype=torch.float64)])
        return original(groups, space_, den_sq, lambda t: all_reduce(t) * factor, **kwargs)

    for name in ("local", "huge other shard"):
        if name != "local":
            monkeypatch.setattr(fused_retention, "pass2", huge_other_shard)
        model, x, y = problem(2)
        opt, stats = run(model, x, y, FlatAdamW, preset="authors-1p5b", retention_space=space, alpha=0.5)
        if name == "local":
            assert stats[0]["inactive_frac"] < 0.1
        else:
            assert stats[0]["inactive_frac"] == 1.0 and stats[0]["scale_mean"] == 1.0


def test_a_tensor_at_lr_zero_takes_no_ratio():
    """Pass 1 did not step the first layer (lr 0): no direction to read, so no ratio there (scale 1, inactive), as
    the unfused path leaves it out; the rest as before. The float64 unfused run is the reference."""
    def groups_of(model):
        return [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}]

    results = []
    for base, dtype in ((FlatAdamW, torch.float32), (torch.optim.AdamW, torch.float64)):
        model, x, y = problem(4)
        model = model.to(dtype)
        opt = GXPO(groups_of(model), base=base, lr=3e-2, gate="never", preset="authors-1p5b")

        xd, yd = x.to(dtype), y.to(dtype)

        def closure(model=model, xd=xd, yd=yd):
            loss = torch.nn.functional.mse_loss(model(xd), yd)
            loss.backward()
            return loss

        first = [p.detach().clone() for p in model[0].parameters()]
        for _ in range(2):
            opt.step(closure)
        assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), first, strict=True))
        results.append((opt.last_stats, [p.detach().double() for p in model.parameters()]))
    (fused, fused_params), (ref, ref_params) = results
    n_first = sum(p.numel() for p in problem(4)[0][0].parameters())
    n_total = sum(p.numel() for p in problem(4)[0].parameters())
    assert fused["inactive_frac"] >= n_first / n_total
    for key in ("inactive_frac", "r_mean", "scale_mean", "scale_max", "ratio_clip_frac"):
        assert fused[key] == pytest.approx(ref[key], rel=1e-4, abs=1.5 / n_total), key
    for p, q in zip(fused_params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
