"""GXPO / SFPO behaviour: pass counting, optimizer-state modes, fallbacks, checkpoints, config errors."""

import copy

import pytest
import torch

from gxpo_kernels import GXPO, SFPO
from gxpo_kernels.optim.flat.reference import retention_scale


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return model, x, y


def make_closure(model, x, y, poison_call=None, record=None):
    calls = [0]

    def closure():
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        if calls[0] == poison_call:
            loss = loss * float("nan")
        loss.backward()
        if record is not None:
            record.append([p.grad.clone() for p in model.parameters()])
        return loss, {"entropy_mean": 1.0 + 0.01 * calls[0]}

    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_backward_pass_counting_and_gate_fallback():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, preset="paper", tau=1e-9)  # any |Z| > 0 trips the EMA gate at once
    closure = make_closure(model, x, y)
    opt.step(closure)
    assert opt.backward_passes == 3 and opt.last_stats["active"] == 1.0 and not opt.active
    for n in range(3):
        opt.step(closure)
        assert opt.backward_passes == 4 + n and opt.last_stats["active"] == 0.0


def test_sfpo_counts_k_plus_one():
    model, x, y = tiny_problem()
    opt = SFPO(model.parameters(), K=4, lr=1e-2, tau=100.0)
    for step in range(3):
        opt.step(make_closure(model, x, y))
        assert opt.backward_passes == 5 * (step + 1)
    assert opt.last_stats["gate_stat"] == pytest.approx(1.05)  # the corrective (5th) pass's entropy


def test_gxpo_default_is_the_authors_newest_launcher():
    model, _, _ = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2)
    assert (opt.preset, opt.K, opt.alpha, opt.gate.kind, opt.gate.tau, opt.gate.window, opt.gate.patience,
            opt.gate.warmup, opt.gate_stat, opt.optimizer_state, opt.space) == \
        ("authors-1p5b", 3, 0.8, "window_inclusive", 3.0, 30, 3, 50, "entropy", "transactional", "update")


def test_gxpo_final_preset_gates_on_the_corrective_pass_entropy():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, preset="final")
    assert (opt.preset, opt.K, opt.alpha, opt.gate.kind, opt.gate.tau, opt.gate.window, opt.gate_stat) == \
        ("final", 3, 0.5, "window_inclusive", 2.0, 30, "entropy")
    opt.step(make_closure(model, x, y))
    assert opt.last_stats["gate_stat"] == pytest.approx(1.03)  # the third pass's entropy

    def no_entropy():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = params_of(model)
    with pytest.raises(ValueError, match="entropy"):
        opt.step(no_entropy)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True)), "failed before any step"


def test_presets_and_overrides():
    model, _, _ = tiny_problem()
    paper = GXPO(model.parameters(), preset="paper")
    assert (paper.K, paper.alpha, paper.gate.kind, paper.gate.tau, paper.gate_stat) == (5, 0.5, "ema", 0.5,
                                                                                        "trajectory")
    mixed = GXPO(model.parameters(), preset="paper", K=4, gate="window")
    assert (mixed.K, mixed.gate.kind, mixed.gate.tau) == (4, "window", 0.5)
    sfpo = SFPO(model.parameters())
    assert (sfpo.K, sfpo.alpha, sfpo.gate.kind, sfpo.gate.tau, sfpo.gate.window) == (3, 0.8, "window_inclusive",
                                                                                     1.0, 30)
    with pytest.raises(ValueError, match="preset must be one of"):
        GXPO(model.parameters(), preset="best")


def test_sfpo_needs_a_gate_statistic():
    model, x, y = tiny_problem()
    opt = SFPO(model.parameters(), lr=1e-2)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="entropy"):
        opt.step(closure)
    opt.step(closure, gate_value=2.0)
    assert opt.last_stats["gate_stat"] == 2.0


def test_diagnostics_are_reported():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, preset="paper", gate="never")
    opt.step(make_closure(model, x, y))
    s = opt.last_stats
    for key in ("g0_norm", "g1_norm", "gtilde_norm", "cos_g0_g1", "cos_g0_gtilde", "r_mean", "r_std", "scale_mean",
                "scale_max", "step_norm", "scaled_step_norm", "inactive_frac", "ratio_clip_frac", "z", "gate_stat"):
        assert isinstance(s[key], float) and s[key] == s[key], key
    assert 1.0 <= s["scale_mean"] <= s["scale_max"] <= 5 / 2 + 1
    assert -1.0 <= s["cos_g0_g1"] <= 1.0 and s["step_norm"] > 0 and 0 <= s["inactive_frac"] < 1
    assert s["gate_stat"] == s["gtilde_norm"]


def test_diagnostics_average_over_all_coordinates_as_the_authors_do():
    model, x, y = tiny_problem()
    unused = torch.nn.Parameter(torch.randn(7))  # no gradient: 7 inactive coordinates (r = scale = 1)
    params = list(model.parameters()) + [unused]
    opt = GXPO(params, base=torch.optim.SGD, lr=0.1, preset="paper", gate="never")
    grads = []
    opt.step(make_closure(model, x, y, record=grads))
    g0 = torch.cat([g.flatten() for g in grads[0]] + [torch.zeros(7)]).double()
    g1 = torch.cat([g.flatten() for g in grads[1]] + [torch.zeros(7)]).double()
    scale, r, active, _ = retention_scale(g0, g1, K=5, delta=1e-8)
    s = opt.last_stats
    assert (~active).sum() >= 7
    assert s["r_mean"] == pytest.approx(r.mean().item(), rel=1e-5)
    assert s["r_std"] == pytest.approx(r.std(unbiased=False).item(), rel=1e-4)
    assert s["scale_mean"] == pytest.approx(scale.mean().item(), rel=1e-5)
    assert s["r_mean_active"] == pytest.approx(r[active].mean().item(), rel=1e-5)
    assert s["scale_mean_active"] == pytest.approx(scale[active].mean().item(), rel=1e-5)
    assert s["inactive_frac"] == pytest.approx((~active).double().mean().item())


@pytest.mark.parametrize("mode,expected_steps", [("accumulate", 3), ("transactional", 1),
                                                 ("transactional_fast_state", 3)])
def test_optimizer_state_modes(mode, expected_steps):
    model, x, y = tiny_problem()
    grads = []
    opt = GXPO(model.parameters(), lr=1e-2, gate="never", optimizer_state=mode, betas=(0.9, 0.99))
    opt.step(make_closure(model, x, y, record=grads))
    for p, g_tilde in zip(model.parameters(), grads[2], strict=True):
        state = opt.base.state[p]
        assert state["step"].item() == expected_steps
        if mode == "transactional":  # only the corrective step is retained: moments of one step from zero
            assert torch.allclose(state["exp_avg"], 0.1 * g_tilde, rtol=1e-6, atol=1e-9)
            assert torch.allclose(state["exp_avg_sq"], 0.01 * g_tilde**2, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("poison_call,reason", [(1, 1.0), (2, 3.0), (3, 4.0)])
def test_nonfinite_pass_falls_back_to_a_plain_step(poison_call, reason):
    model, x, y = tiny_problem()
    theta0 = params_of(model)
    reference, _, _ = tiny_problem()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    ref_opt.step()

    opt = GXPO(model.parameters(), lr=1e-2, gate="never", optimizer_state="transactional")
    opt.step(make_closure(model, x, y, poison_call=poison_call))
    assert opt.last_stats["fallback"] == reason
    assert all(torch.isfinite(p).all() for p in model.parameters())
    expected = theta0 if poison_call == 1 else params_of(reference)  # NaN g0: no step at all
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,expected_steps", [("accumulate", 3), ("transactional", 1),
                                                 ("transactional_fast_state", 1)])
def test_a_failed_corrective_pass_rolls_the_optimizer_back_unless_accumulating(mode, expected_steps):
    """The authors' transactional modes both restore theta0 and the pre-step moments when a pass fails
    (restore_probe_state), then take one plain step; accumulate keeps the two probe steps' moments."""
    model, x, y = tiny_problem()
    reference, _, _ = tiny_problem()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    ref_opt.step()
    opt = GXPO(model.parameters(), lr=1e-2, gate="never", optimizer_state=mode)
    opt.step(make_closure(model, x, y, poison_call=3))
    assert opt.last_stats["fallback"] == 4.0
    for p, e in zip(model.parameters(), reference.parameters(), strict=True):
        assert opt.base.state[p]["step"].item() == expected_steps
        if mode != "accumulate":  # exactly one plain step from theta0
            assert torch.allclose(p, e, rtol=1e-6, atol=1e-7)


def test_skip_corrective_keeps_theta_tilde_and_the_pre_step_moments():
    """No pass 3: theta_tilde (where a full step would evaluate its corrective pass) is the update; with the
    transactional state the moments are left as before the step (the authors' skip_corrective)."""
    model, x, y = tiny_problem()
    full, _, _ = tiny_problem()
    seen = []

    def record_params_then(closure, m):
        def wrapped():
            seen.append(params_of(m))
            return closure()
        return wrapped

    GXPO(full.parameters(), lr=1e-2, gate="never", optimizer_state="transactional").step(
        record_params_then(make_closure(full, x, y), full))
    opt = GXPO(model.parameters(), lr=1e-2, gate="never", optimizer_state="transactional", skip_corrective=True)
    opt.step(make_closure(model, x, y))
    assert opt.backward_passes == 2 and "gtilde_norm" not in opt.last_stats
    assert opt.last_stats["gate_stat"] == pytest.approx(1.01)  # pass 1's entropy stands in
    for p, e in zip(model.parameters(), seen[2], strict=True):
        assert torch.equal(p, e)
    assert not opt.base.state  # the snapshot was taken before the first step ever: nothing kept


def test_max_active_steps_closes_the_gate_for_good():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, gate="never", max_active_steps=2, fallback="temporary",
               fallback_window=1)
    passes, spent = [], []
    for _ in range(5):
        opt.step(make_closure(model, x, y))
        passes.append(opt.backward_passes)
        spent.append(opt.last_stats["budget_spent"])
    assert passes == [3, 6, 7, 8, 9] and spent == [0.0, 0.0, 1.0, 1.0, 1.0]
    restored = GXPO(tiny_problem()[0].parameters(), lr=1e-2, gate="never", max_active_steps=2)
    restored.load_state_dict(opt.state_dict())
    assert restored.budget_spent and not restored.active


def test_cosine_gate_statistic_is_one_minus_the_absolute_cosine():
    model, x, y = tiny_problem()
    grads = []
    opt = GXPO(model.parameters(), lr=1e-2, gate="never", gate_stat="cosine")
    opt.step(make_closure(model, x, y, record=grads))
    g0 = torch.cat([g.double().flatten() for g in grads[0]])
    gt = torch.cat([g.double().flatten() for g in grads[2]])
    expected = 1 - abs((g0 @ gt) / (g0.norm() * gt.norm() + 1e-12)).item()
    assert opt.last_stats["gate_stat"] == pytest.approx(expected, abs=1e-7)  # float32 dots, as the authors'


def test_parameters_without_grad_are_left_alone():
    model, x, y = tiny_problem()
    unused = torch.nn.Parameter(torch.randn(4))
    opt = GXPO(list(model.parameters()) + [unused], lr=1e-2, gate="never", weight_decay=0.1)
    before = unused.detach().clone()
    opt.step(make_closure(model, x, y))
    assert torch.equal(unused, before) and unused.grad is None


def test_state_dict_round_trip_is_bit_exact():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, tau=3.0, max_grad_norm=0.5)
    for _ in range(2):
        opt.step(make_closure(model, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(make_closure(model, x, y))
    expected, expected_stats = params_of(model), dict(opt.last_stats)

    model2, _, _ = tiny_problem(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = GXPO(model2.parameters(), lr=1e-2, tau=3.0, max_grad_norm=0.5)
    opt2.load_state_dict(saved_opt)
    opt2.step(make_closure(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model2), expected, strict=True))
    assert opt2.last_stats == expected_stats and opt2.backward_passes == opt.backward_passes


def test_prebuilt_base_and_lr_scheduler():
    model, x, y = tiny_problem()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GXPO(model.parameters(), base=base, gate="never")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_closure(model, x, y))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="already-built optimizer"):
        GXPO(model.parameters(), base=base, lr=0.1)


def test_gradient_clipping_bounds_each_step():
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), base=torch.optim.SGD, lr=1.0, gate="never", max_grad_norm=1e-3, K=2, alpha=1.0)
    theta0 = params_of(model)
    opt.step(make_closure(model, x, y))
    moved = sum((p - t).double().square().sum() for p, t in zip(model.parameters(), theta0, strict=True)).sqrt()
    assert opt.last_stats["g0_norm"] > 1e-3
    assert moved.item() <= 3 * 1e-3 * (1 + 1e-4)  # K = 2, alpha = 1: scale 1; three clipped SGD steps


@pytest.mark.parametrize("kwargs,message", [
    ({"K": 1}, "K must be an int >= 2"), ({"alpha": 0.0}, r"alpha must be in \(0, 1\]"),
    ({"alpha": 1.5}, "alpha must be"), ({"tau": 0.0}, "tau must be > 0"), ({"gate": "maybe"}, "gate must be one of"),
    ({"gate_stat": "loss"}, "gate_stat must be one of"), ({"optimizer_state": "x"}, "optimizer_state must be one of"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be"), ({"base": "adam"}, "base must be"),
    ({"max_active_steps": -1}, "max_active_steps must be an int >= 0"),
    ({"skip_corrective": "yes"}, "skip_corrective must be true or false"),
    ({"robust": True}, "robust must be false, or true with gate = 'window'"),
])
def test_bad_config(kwargs, message):
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match=message):
        GXPO(model.parameters(), **kwargs)


def test_step_needs_a_closure():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="closure"):
        GXPO(model.parameters()).step()


def test_mixed_dtypes_make_separate_groups_and_match_reference():
    """float32 and float64 parameters: two flat groups (Triton/interpreter and C++ paths), same math."""
    torch.manual_seed(0)
    a32, a64 = torch.nn.Parameter(torch.randn(37)), torch.nn.Parameter(torch.randn(29, dtype=torch.float64))
    h32, h64 = torch.rand(37) + 0.5, torch.rand(29, dtype=torch.float64) + 0.5

    def closure():
        loss = 0.5 * (h32 * a32 * a32).sum() + 0.5 * (h64 * a64 * a64).sum().float()
        loss.backward()
        return loss

    theta0 = (a32.detach().double().clone(), a64.detach().clone())
    opt = GXPO([a32, a64], base=torch.optim.SGD, lr=0.1, K=3, alpha=1.0, gate="never")
    opt.step(closure)
    assert len(opt._flat_groups()) == 2
    for p, t0, h in zip((a32, a64), theta0, (h32.double(), h64), strict=True):
        expected = t0 * (1 - 0.1 * h) ** 4  # K + 1 = 4 GD steps on the quadratic
        assert torch.allclose(p.detach().double(), expected, rtol=1e-5)


def entropy_closure(model, x, y, entropy, tokens, calls=None):
    """A closure whose metrics say: entropy_mean `entropy` over `tokens` tokens (as the trainer's and TRL's do)."""

    def closure():
        if calls is not None:
            calls.append(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss, {"entropy_mean": entropy, "entropy_tokens": tokens}

    return closure


def test_gate_batch_observes_once_the_token_mean_of_its_steps():
    """Three outer batches of two mini-batch steps: the gate observes once per batch, the token-weighted mean of
    the steps' corrective-pass entropies (the GXPO authors' update_policy_gxpo); window_inclusive W = 2, tau 0.5:
    batch 1: (1.0 x 10, 2.0 x 30) -> 1.75, unscored; batch 2: (3.0 x 1, 1.0 x 3) -> 1.5 (the plain mean, 2.0, would
    trip), z = (1.5 - 1.625) / 0.125 = -1; batch 3: (2.0, 2.0) -> 2.0, z = (2.0 - 1.75) / 0.25 = 1 >= 0.5: trips, so
    batch 4 is plain."""
    model, x, y = tiny_problem()
    opt = GXPO(model.parameters(), lr=1e-2, preset="final", window=2, tau=0.5)
    batches = [((1.0, 10), (2.0, 30)), ((3.0, 1), (1.0, 3)), ((2.0, 1), (2.0, 1)), ((5.0, 1), (5.0, 1))]
    seen = []
    for batch in batches:
        with opt.gate_batch():
            for entropy, tokens in batch:
                opt.step(entropy_closure(model, x, y, entropy, tokens))
                assert "z" not in opt.last_stats  # no observation inside the batch
        seen.append({k: opt.last_stats.get(k) for k in ("z", "gate_stat", "gate_open", "active")})
    assert seen[0] == {"z": 0.0, "gate_stat": 1.75, "gate_open": 1.0, "active": 1.0}
    assert seen[1]["gate_stat"] == 1.5 and seen[1]["z"] == pytest.approx(-1.0, rel=1e-6)
    assert seen[2]["gate_stat"] == 2.0 and seen[2]["z"] == pytest.approx(1.0, rel=1e-6) and seen[2]["gate_open"] == 0
    assert seen[3] == {"z": None, "gate_stat": None, "gate_open": 0.0, "active": 0.0}
    assert opt.gate.seen == 3 and list(opt.gate.history) == [1.5, 2.0]
    assert opt.steps == 8 and opt.gate_steps == 4 and opt.backward_passes == 3 * 2 * 3 + 2


def test_gate_batches_count_once_for_the_budget_and_a_temporary_fallback():
    model, x, y = tiny_problem()
    opt = SFPO(model.parameters(), K=2, lr=1e-2, tau=100.0, max_active_steps=1)
    for batch in range(2):  # the budget counts outer batches: all of batch 1 extrapolates, none of batch 2
        with opt.gate_batch():
            for _ in range(3):
                opt.step(entropy_closure(model, x, y, 1.0, 4))
        assert opt.backward_passes == [9, 12][batch]  # 3 x (K + 1), then 3 x 1
    assert opt.budget_spent and opt.gate_steps == 2 and opt.steps == 6 and opt.backward_passes == 12

    model, x, y = tiny_problem()  # tripped by batch 1 with fallback_window 1: batch 2 plain, batch 3 active again
    opt = GXPO(model.parameters(), lr=1e-2, preset="paper", tau=1e-9, fallback="temporary", fallback_window=1)
    passes = []
    for _ in range(3):
        before = opt.backward_passes
        with opt.gate_batch():
            for _ in range(2):
                opt.step(entropy_closure(model, x, y, 1.0, 4))
        passes.append(opt.backward_passes - before)
    assert passes == [6, 2, 6] and opt.gate.trips == 2


def test_a_checkpoint_inside_a_gate_batch_resumes_exactly():
    def run(cut):
        model, x, y = tiny_problem()
        opt = GXPO(model.parameters(), lr=1e-2, preset="final", window=2, tau=0.5)
        saved = None
        for b, batch in enumerate([((1.0, 10), (2.0, 30)), ((3.0, 1), (1.0, 3)), ((2.0, 1), (2.0, 1))]):
            opt.begin_gate_batch()
            for i, (entropy, tokens) in enumerate(batch):
                if (b, i) == cut:  # a fresh model and rule from what was saved before this step
                    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                    model, x, y = tiny_problem(seed=1)
                    opt = GXPO(model.parameters(), lr=1e-2, preset="final", window=2, tau=0.5)
                    model.load_state_dict(saved[0])
                    opt.load_state_dict(saved[1])
                    assert opt.in_gate_batch
                    x, y = tiny_problem()[1:]
                opt.step(entropy_closure(model, x, y, entropy, tokens))
            opt.end_gate_batch()
        return params_of(model), opt.gate.state_dict(), opt.backward_passes

    straight, resumed = run(cut=None), run(cut=(1, 1))
    for a, b in zip(straight[0], resumed[0], strict=True):
        assert torch.equal(a, b)
    assert straight[1:] == resumed[1:] and straight[1]["history"] == [1.5, 2.0]
