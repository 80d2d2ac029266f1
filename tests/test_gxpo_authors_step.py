"""GXPO's whole step in the authors' retention spaces against their mini-batch step, transcribed from their
code (github SwapniL-afk-now/final-gxpo 1a301e16, Code/SFPO/verl/workers/actor/dp_actor.py,
_gxpo_minibatch_step; the retention functions of gxpo_state.py at d2afd2cf as tests/test_retention_authors.py
transcribes them; optimizer_transaction.py's snapshot / restore), in float64 on a small model, several steps
in a row: the parameters and AdamW's state to 1e-10."""

import copy

import pytest
import torch
from test_retention_authors import (
    theirs_adamw_direction,
    theirs_adamw_direction_from_step,
    theirs_coordinatewise,
    theirs_reposition,
)

from gxpo_kernels import GXPO

LR, WD, BETAS, DELTA = 3e-2, 1e-2, (0.9, 0.999), 1e-8


def problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()
    x, y = torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    return model, x, y


def loss_of(model, x, y, step):
    """A batch that changes each step (their mini-batches differ), the same for all three passes."""
    g = torch.Generator().manual_seed(100 + step)
    rows = torch.randperm(32, generator=g)[:24]
    return torch.nn.functional.mse_loss(model(x[rows]), y[rows])


def theirs_snapshot(opt):
    return {p: {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
            for p, s in opt.state.items()}


def theirs_restore(opt, snap):
    for p in list(opt.state):
        if p not in snap:
            del opt.state[p]
    for p, s in snap.items():
        live = opt.state[p]
        for k in list(live):
            if k not in s:
                del live[k]
        for k, v in s.items():
            if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                live[k].copy_(v)
            else:
                live[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)


def theirs_probe_pass(params, opt, loss_fn, grad_clip):
    """One probe pass: (raw gradients, their recorded clip multiplier, lr / wd per parameter after the step)."""
    opt.zero_grad()
    loss_fn().backward()
    grads = [p.grad.detach().clone() for p in params]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    opt.step()
    return grads, min(1.0, grad_clip / (abs(norm) + 1e-12)), [(grp["lr"], grp["weight_decay"])
                                                               for grp in opt.param_groups for _ in grp["params"]]


def theirs_minibatch_step(model, opt, loss_fn, *, K, alpha, grad_clip, space, mode, min_eff):
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    snap = theirs_snapshot(opt)
    g0, c0, hp0 = theirs_probe_pass(params, opt, loss_fn, grad_clip)  # pass 1
    u0 = [p.detach() - t for p, t in zip(params, theta0, strict=True)]
    g1, c1, hp1 = theirs_probe_pass(params, opt, loss_fn, grad_clip)  # pass 2
    with torch.no_grad():
        for i, p in enumerate(params):
            if space == "grad":
                rms = g0[i].square().mean().sqrt()
                _, scale, _, _ = theirs_coordinatewise(g0[i], g1[i], K, DELTA, c0, c1, den_rms=rms)
            else:
                d0 = theirs_adamw_direction_from_step(theta0[i], u0[i], *hp0[i])
                d1 = theirs_adamw_direction(theta0[i] + u0[i], p.data, *hp1[i])
                _, scale, _, _ = theirs_coordinatewise(d0, d1, K, DELTA, den_rms=d0.square().mean().sqrt())
            p.data.copy_(theirs_reposition(theta0[i], p.data, scale, alpha, min_eff))
    theirs_corrective_pass(params, opt, loss_fn, grad_clip, mode, snap)


def theirs_corrective_pass(params, opt, loss_fn, grad_clip, mode, snap):
    """Pass 3 at theta_tilde, after the transactional rollback of the probe moments."""
    if mode == "transactional":
        theirs_restore(opt, snap)
    opt.zero_grad()
    loss_fn().backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


@pytest.mark.parametrize("space", ["grad", "update"])
@pytest.mark.parametrize("grad_clip", [0.05, 10.0])  # clipping every pass / never
@pytest.mark.parametrize("mode", ["transactional", "transactional_fast_state"])
@pytest.mark.parametrize("K,alpha,min_eff", [(3, 0.8, 0.0), (10, 0.3, 0.0), (5, 0.3, 0.5)])
def test_gxpo_step_equals_the_authors(space, grad_clip, mode, K, alpha, min_eff):
    model, x, y = problem()
    theirs = copy.deepcopy(model)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=WD, betas=BETAS)
    ours = GXPO(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, K=K, alpha=alpha, gate="never",
                retention_space=space, optimizer_state=mode, max_grad_norm=grad_clip, min_effective_multiplier=min_eff)
    for step in range(4):
        theirs_minibatch_step(theirs, their_opt, lambda s=step: loss_of(theirs, x, y, s), K=K, alpha=alpha,
                              grad_clip=grad_clip, space=space, mode=mode, min_eff=min_eff)

        def closure(s=step):
            loss = loss_of(model, x, y, s)
            loss.backward()
            return loss, {}

        ours.step(closure)
        assert ours.last_stats["active"] == 1.0 and ours.last_stats["fallback"] == 0.0
        for p, q in zip(model.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(ours.base.state[p][k], their_opt.state[q][k], rtol=1e-10, atol=1e-14)
    assert ours.backward_passes == 12


def test_update_space_moves_differently_from_the_raw_gradient_space():
    """The same step in AdamW's space and in the raw-gradient space the presets final / paper keep."""
    results = {}
    for space in ("raw_grad", "update"):
        model, x, y = problem()
        opt = GXPO(model.parameters(), lr=LR, weight_decay=WD, K=5, alpha=0.5, gate="never", retention_space=space)

        def closure(m=model, x=x, y=y):
            loss = loss_of(m, x, y, 0)
            loss.backward()
            return loss, {}

        opt.step(closure)
        results[space] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt.last_stats)
    assert not torch.allclose(results["raw_grad"][0], results["update"][0])
    assert results["update"][1]["inactive_frac"] < 0.5


def test_auto_takes_adamws_space_and_warns_once_for_another_optimizer():
    model, _, _ = problem()
    assert GXPO(model.parameters(), lr=LR, retention_space="auto").space == "update"
    with pytest.warns(UserWarning, match="not a decoupled AdamW"):
        rule = GXPO(model.parameters(), base=torch.optim.SGD, lr=LR, retention_space="auto")
    assert rule.space == "grad"
    with pytest.raises(ValueError, match="decoupled AdamW"):
        GXPO(model.parameters(), base=torch.optim.SGD, lr=LR, retention_space="update")
    with pytest.raises(ValueError, match="min_effective_multiplier"):
        GXPO(model.parameters(), lr=LR, retention_space="raw_grad", min_effective_multiplier=0.5)


@pytest.mark.parametrize("space", ["grad", "update"])
def test_the_threshold_reads_the_rms_over_every_shard(space):
    """extrapolate takes RMS(den) from the all-reduced sums of squares and counts (here another 'rank' holding
    a tensor 1e6 times larger): every local coordinate falls under the threshold and moves by alpha."""
    from gxpo_kernels.optim import retention_step
    from gxpo_kernels.optim.flat.buffers import BLOCK, FlatGroup
    from gxpo_kernels.optim.flat.extrapolation import EXTRAP_STATS

    g = torch.Generator().manual_seed(0)
    results = {}
    for name, reduce in (("local", lambda t: t), ("huge other shard", lambda t: t * torch.tensor([[1e12, 1.0]]))):
        p = torch.nn.Parameter(torch.randn(300, generator=g, dtype=torch.float64))
        group = FlatGroup([p], BLOCK)
        theta0 = p.detach().clone()
        group.view(group.theta0, 0).copy_(theta0)
        group.view(group.g0, 0).copy_(torch.randn(300, generator=g, dtype=torch.float64))
        base = torch.optim.AdamW([p], lr=LR, weight_decay=WD)
        probe = retention_step.Probe(space)
        probe.hp0 = retention_step.hyperparameters(base)
        with torch.no_grad():
            step = 1e-3 * torch.randn(300, generator=g, dtype=torch.float64)
            probe.bufs[id(p)] = step if space == "update" else torch.randn(300, generator=g, dtype=torch.float64)
            p.add_(step + 0.5e-3 * torch.randn(300, generator=g, dtype=torch.float64))  # theta2
        theta2 = p.detach().clone()
        sums = retention_step.extrapolate(probe, [group], base, {id(p)}, K=5, alpha=0.5, delta=DELTA, min_eff=0.0,
                                          c0=1.0, c1=1.0, all_reduce=reduce)
        results[name] = (dict(zip(EXTRAP_STATS, sums.tolist(), strict=True)), theta0, theta2, p.detach().clone())
    assert results["local"][0]["n_active"] > 250
    stats, theta0, theta2, tilde = results["huge other shard"]
    assert stats["n_active"] == 0
    torch.testing.assert_close(tilde, theta0 + 0.5 * (theta2 - theta0), rtol=1e-12, atol=1e-15)


# each launcher's values as read in the authors' repository at 1a301e16 (common.sh, then the launcher)
LAUNCHERS = {
    "authors-1p5b": dict(K=3, alpha=0.8, tau=3.0, window=30, patience=3, warmup=50, warmup_reset=True,
                         max_active_steps=0, retention_space="auto", optimizer_state="transactional"),
    "authors-1p5b-ab": dict(K=10, alpha=0.3, tau=3.0, window=30, patience=3, warmup=50, warmup_reset=True,
                            max_active_steps=0, retention_space="grad", optimizer_state="transactional"),
    "authors-7b": dict(K=5, alpha=0.3, tau=1.5, window=30, patience=2, warmup=50, warmup_reset=False,
                       max_active_steps=150, retention_space="auto", optimizer_state="transactional"),
}


@pytest.mark.parametrize("preset", sorted(LAUNCHERS))
def test_the_authors_presets_are_their_launchers(preset):
    from gxpo_kernels.optim.gxpo import GXPORuleConfig

    config = GXPORuleConfig(preset=preset).resolved()
    assert {k: getattr(config, k) for k in LAUNCHERS[preset]} == LAUNCHERS[preset]
    assert (config.gate, config.gate_stat, config.fallback) == ("window_inclusive", "entropy", "permanent")
    model, x, y = problem()
    opt = GXPO(model.parameters(), preset=preset, lr=LR, weight_decay=WD, max_grad_norm=1.0)
    assert opt.space == ("grad" if preset.endswith("-ab") else "update")
    for step in range(3):
        def closure(s=step, m=model, x=x, y=y):
            loss = loss_of(m, x, y, s)
            loss.backward()
            return loss, {"entropy_mean": 1.0 + 0.5 * s}  # a rising entropy: inside the warm-up it cannot trip

        opt.step(closure)
        assert opt.active and opt.last_stats["active"] == 1.0
    assert all(opt.base.state[p]["step"].item() == 3 for p in model.parameters())  # transactional: +1 a step


def test_readme_lists_every_gxpo_preset_with_its_values():
    from pathlib import Path

    from gxpo_kernels.optim.gxpo import GXPORuleConfig

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("### GXPO presets"):]
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    for preset in GXPORuleConfig.presets:
        config = GXPORuleConfig(preset=preset).resolved()
        assert preset in rows, f"README's GXPO presets table has no row for {preset}"
        cells = [c.strip() for c in rows[preset].split("|")[2:-1]]
        assert cells[:4] == [str(config.K), str(config.alpha), str(config.tau), str(config.patience)], preset
        assert config.gate.startswith("ema") or f"W {config.window}" in rows[preset], preset
        assert config.retention_space in rows[preset], preset
        assert config.optimizer_state in rows[preset], preset
        assert ("(default)" in rows[preset]) == (preset == GXPORuleConfig.default_preset), preset
