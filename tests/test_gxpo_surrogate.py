"""On f(theta) = 0.5 * sum(h_i theta_i^2) with base SGD, alpha = 1 and no clamp binding, one GXPO
step lands exactly where K + 1 plain gradient-descent steps land; so does SFPO with alpha = 1."""

import pytest
import torch

from gxpo_kernels import GXPO, SFPO


def quadratic_problem(n, dtype, seed=0, eta=0.1):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05) / eta  # r = 1 - eta h in (0.05, 0.95)
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    return h.to(dtype), theta.to(dtype)


def gd(theta, h, eta, steps):
    for _ in range(steps):
        theta = theta - eta * h * theta
    return theta


def closure_for(param, h):
    def closure():
        loss = 0.5 * (h * param * param).sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("K", [3, 5, 10])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_one_gxpo_step_is_k_plus_one_gd_steps(K, dtype, tol):
    eta = 0.1
    h, theta0 = quadratic_problem(37, dtype, seed=K)
    param = torch.nn.Parameter(theta0.clone())
    opt = GXPO([param], base=torch.optim.SGD, K=K, alpha=1.0, gate="never", lr=eta)
    opt.step(closure_for(param, h))
    expected = gd(theta0.double(), h.double(), eta, K + 1)
    assert ((param.detach().double() - expected).norm() / expected.norm()).item() < tol
    assert opt.last_stats["ratio_clip_frac"] == 0 and opt.last_stats["active"] == 1.0
    assert opt.backward_passes == 3


@pytest.mark.parametrize("K", [2, 3, 5])
def test_sfpo_alpha_one_is_k_plus_one_gd_steps(K):
    eta = 0.1
    h, theta0 = quadratic_problem(23, torch.float64, seed=K)
    param = torch.nn.Parameter(theta0.clone())
    opt = SFPO([param], base=torch.optim.SGD, K=K, alpha=1.0, gate="never", lr=eta)
    opt.step(closure_for(param, h))
    expected = gd(theta0, h, eta, K + 1)
    assert ((param.detach() - expected).norm() / expected.norm()).item() < 1e-12
    assert opt.backward_passes == K + 1


def test_alpha_moves_part_of_the_way():
    """alpha < 1: theta_tilde = theta0 + alpha * scale * (theta2 - theta0), then one GD step."""
    eta, K, alpha = 0.1, 5, 0.5
    h, theta0 = quadratic_problem(16, torch.float64, seed=3)
    param = torch.nn.Parameter(theta0.clone())
    GXPO([param], base=torch.optim.SGD, K=K, alpha=alpha, gate="never", lr=eta).step(closure_for(param, h))
    theta_k = gd(theta0, h, eta, K)
    theta_tilde = theta0 + alpha * (theta_k - theta0)
    assert torch.allclose(param.detach(), gd(theta_tilde, h, eta, 1), rtol=1e-12, atol=1e-14)
