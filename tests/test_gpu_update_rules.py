"""Compiled Triton flat ops and the update rules on CUDA (skipped without a GPU)."""

import pytest
import torch
from helpers import rel_err
from test_gxpo_surrogate import closure_for, gd, quadratic_problem

from gxpo_kernels import GXPO, backend
from gxpo_kernels.optim.flat import ops as flat_ops
from gxpo_kernels.optim.flat.buffers import FlatGroup
from gxpo_kernels.optim.flat.reference import extrapolate_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("K", [3, 5, 10])
def test_surrogate_exactness_fp32_on_cuda(K):
    eta = 0.1
    h, theta0 = quadratic_problem(100_003, torch.float32, seed=K)
    h, theta0 = h.cuda(), theta0.cuda()
    param = torch.nn.Parameter(theta0.clone())
    opt = GXPO([param], base=torch.optim.SGD, K=K, alpha=1.0, gate="never", lr=eta)
    assert backend.use_triton(param)
    opt.step(closure_for(param, h))
    expected = gd(theta0.double(), h.double(), eta, K + 1)
    assert ((param.detach().double() - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_extrapolate_on_cuda_matches_reference(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1, 4095, 4096, 4097, 1_000_003]
    params = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
    g0 = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
    g1 = [(a.float() * 0.7 + 0.1 * torch.randn(a.shape, device="cuda", generator=g)).to(dtype) for a in g0]
    group = FlatGroup(params, 1024)
    group.theta0.fill_(float("nan"))
    flat_ops.snapshot(group, g0)
    theta0 = [p.clone() for p in params]
    for p in params:
        p.add_(0.01)
    theta2 = [p.clone() for p in params]
    flat_ops.extrapolate(group, g1, K=5, alpha=0.5, delta=1e-8)
    for p, t0, t2, a, b in zip(params, theta0, theta2, g0, g1, strict=True):
        ref, _ = extrapolate_reference(t0.double(), t2.double(), a.double(), b.double(), K=5, alpha=0.5)
        assert rel_err(p, ref) < tol


@pytest.mark.parametrize("base", [torch.optim.AdamW, "flat_adamw"])
def test_steady_state_active_steps_upload_nothing_on_cuda(monkeypatch, base):
    """With CUDA's caching allocator handing backward the same gradient buffers step after step, every pointer
    table of an active GXPO step comes from its group's cache: no host-to-device upload at all."""
    from gxpo_kernels import FlatAdamW
    from gxpo_kernels.optim.flat import buffers as flat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8)).cuda()
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss, {"entropy_mean": 1.0}

    opt = GXPO(model.parameters(), base=FlatAdamW if base == "flat_adamw" else base, lr=1e-3, gate="never")
    for _ in range(2):
        opt.step(closure)
    uploads, upload = [], flat.upload
    monkeypatch.setattr(flat, "upload", lambda *a, **k: uploads.append(1) or upload(*a, **k))
    for _ in range(3):
        opt.step(closure)
    assert opt.last_stats["active"] == 1.0
    assert uploads == []
