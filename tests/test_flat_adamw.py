"""FlatAdamW's fused Triton step (the interpreter on CPU) against torch.optim.AdamW, and its snapshot."""

import pytest
import torch
from helpers import rel_err

from gxpo_kernels import backend
from gxpo_kernels.optim.flat.buffers import BLOCK, build_groups
from gxpo_kernels.optim.flat_adamw import FlatAdamW

SHAPES = [(3, 5), (1030,), (7,), (2, 1025)]  # around and across the 1024-element blocks


@pytest.fixture(autouse=True)
def needs_triton():
    if not backend.use_triton(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("needs the Triton path: CUDA or TRITON_INTERPRET=1")


def make_params(seed, device, unaligned=()):
    """unaligned: indices of parameters that start 4 bytes past a 16-byte boundary."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g).to(device) for s in SHAPES]
    shifted = lambda x: torch.empty(x.numel() + 1, device=device)[1:].view_as(x).copy_(x)  # noqa: E731
    return [(shifted(x) if i in unaligned else x).requires_grad_() for i, x in enumerate(values)]


def set_grads(params, step, skip=None):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g).to(p.device)


@pytest.mark.parametrize("unaligned", [(), (1,)], ids=["aligned", "one_unaligned"])
def test_matches_torch_adamw(device, unaligned):
    ours, ref = make_params(0, device, unaligned), make_params(0, device)
    assert build_groups(ours, BLOCK)[0].params_aligned == (not unaligned)
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]
    opt = FlatAdamW(groups(ours), betas=(0.9, 0.95), eps=1e-6)
    ref_opt = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), eps=1e-6, foreach=False)
    assert opt.uses_kernel()
    for step in range(4):
        skip = 2 if step == 1 else None  # a parameter without a gradient is skipped, its step count too
        set_grads(ours, step, skip)
        set_grads(ref, step, skip)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        assert rel_err(p, q) < 1e-6
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert rel_err(opt.state[p][key], ref_opt.state[q][key]) < 1e-6, key
    torch.optim.AdamW(groups(make_params(0, device))).load_state_dict(opt.state_dict())  # the same format


def test_grad_scale_and_snapshot(device):
    ours, ref = make_params(1, device), make_params(1, device)
    opt, ref_opt = FlatAdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    set_grads(ours, 0, skip=1)
    set_grads(ref, 0, skip=1)
    before = [p.detach().clone() for p in ours]
    raw = [None if p.grad is None else p.grad.clone() for p in ours]
    groups = build_groups(ours, BLOCK)
    for group in groups:
        group.theta0.fill_(float("nan")), group.g0.fill_(float("nan"))
    opt.step(grad_scale=0.25, snapshot_groups=groups)
    for q in ref:
        if q.grad is not None:
            q.grad.mul_(0.25)
    ref_opt.step()
    for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
        assert rel_err(p, q) < 1e-6
        assert torch.equal(groups[0].view(groups[0].theta0, i), before[i])
        expected_g0 = torch.zeros_like(before[i]) if raw[i] is None else raw[i]  # raw, not scaled
        assert torch.equal(groups[0].view(groups[0].g0, i), expected_g0)
        if raw[i] is not None:
            assert torch.equal(p.grad, raw[i])  # the gradients themselves are left alone


def test_unsupported_flags():
    with pytest.raises(ValueError, match="amsgrad"):
        FlatAdamW([torch.zeros(2, requires_grad=True)], amsgrad=True)


@pytest.mark.parametrize("rule", ["gxpo", "sfpo"])
@pytest.mark.parametrize("optimizer_state", ["accumulate", "transactional"])
def test_update_rules_with_the_fused_base_equal_the_unfused(device, rule, optimizer_state):
    """GXPO/SFPO over FlatAdamW (pass-1 snapshot inside the AdamW kernel) take the same steps as over
    torch's AdamW (separate snapshot), with the gradient clip binding."""
    from gxpo_kernels import GXPO, SFPO

    results = []
    for base in (FlatAdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(33, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).to(device)
        x, y = torch.randn(64, 33, device=device), torch.randn(64, 3, device=device)
        kwargs = {"base": base, "lr": 1e-2, "gate": "never", "max_grad_norm": 0.05, "optimizer_state": optimizer_state}
        opt = GXPO(model.parameters(), **kwargs) if rule == "gxpo" else SFPO(model.parameters(), **kwargs)
        assert opt._fused_base() == (base is FlatAdamW)

        def closure(model=model, x=x, y=y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        assert opt.last_stats["fallback"] == 0 and opt.last_stats["active"] == 1
        results.append(([p.detach().clone() for p in model.parameters()], dict(opt.last_stats)))
    (fused, fused_stats), (plain, plain_stats) = results
    for p, q in zip(fused, plain, strict=True):
        assert rel_err(p, q) < 1e-5
    keys = ["g0_norm"] + (["g1_norm", "gtilde_norm", "r_mean", "r_std", "scale_mean", "scale_max", "step_norm",
                                      "scaled_step_norm", "inactive_frac", "cos_g0_g1"] if rule == "gxpo" else [])
    for key in keys:  # with GXPO the pass-2 AdamW kernel also extrapolates and returns the diagnostics
        assert fused_stats[key] == pytest.approx(plain_stats[key], rel=1e-4, abs=1e-7), key
