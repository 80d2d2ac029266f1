"""GXPO bookkeeping written the obvious way, per tensor (the baseline our flat kernels are timed against):
clones for the snapshot, float64 norms and dot products with temporaries, the extrapolation as a chain of
elementwise torch ops per parameter. Same math as gxpo_kernels.optim.flat.reference."""

import torch

from gxpo_kernels.optim.flat.reference import retention_scale


def snapshot(params, grads):
    theta0 = [p.detach().clone() for p in params]
    g0 = [g.detach().clone() for g in grads]
    g0_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in g0))
    return theta0, g0, g0_norm.item()


def grad_norm_and_dot(grads, g0=None):
    sq = sum(g.double().pow(2).sum() for g in grads)
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g0, grads, strict=True)) if g0 is not None else 0.0
    return torch.sqrt(sq).item(), float(dot)


def extrapolate(params, grads, theta0, g0, K, alpha, delta=1e-8):
    n_active = r_sum = scale_sum = d_sq = 0.0
    for p, g1, t0, a in zip(params, grads, theta0, g0, strict=True):
        scale, r, active, _ = retention_scale(a.double(), g1.double(), K, delta)
        d = p.double() - t0.double()
        p.copy_(t0.double() + alpha * scale * d)
        n_active += active.sum().item()
        r_sum += torch.where(active, r, 0.0).sum().item()
        scale_sum += torch.where(active, scale, 0.0).sum().item()
        d_sq += d.pow(2).sum().item()
    return {"n_active": n_active, "r_sum": r_sum, "scale_sum": scale_sum, "d_sq": d_sq}


def bookkeeping(params, g0_list, g1_list, gt_list, K=5, alpha=0.5):
    """Everything an active GXPO step does besides the three closures and the three base steps."""
    theta0, g0, _ = snapshot(params, g0_list)
    grad_norm_and_dot(g1_list)
    extrapolate(params, g1_list, theta0, g0, K, alpha)
    grad_norm_and_dot(gt_list, g0)
