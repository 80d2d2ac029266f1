"""Plain PyTorch reference of GXPO's per-coordinate extrapolation (docs/algorithm.md, step 3), and the
flat ops' torch fallback. Elementwise on one tensor; the flat-buffer kernels compute the same thing over
all parameters in one launch per dtype group and reduce the same diagnostics.
"""

import torch

from .extrapolation import DELTA, EXTRAP_STATS, R_MAX, R_MIN, scale_cap

__all__ = ["EXTRAP_STATS", "R_MAX", "R_MIN", "extrapolate_reference", "geometric_sum", "retention_scale"]


def geometric_sum(r, n: int):
    """S_n(r) = 1 + r + ... + r^(n-1), by Horner's rule (exact at r == 1, no division)."""
    s = torch.ones_like(r)
    for _ in range(n - 1):
        s = s * r + 1
    return s


def retention_scale(g0, g1, K: int, delta: float):
    """(scale, r, active, clipped): the per-coordinate extrapolation factor and what led to it."""
    active = g0.abs() > delta
    r = g1 / (torch.where(g0 >= 0, 1.0, -1.0) * g0.abs().clamp(min=delta))
    clipped = active & (~torch.isfinite(r) | (r < R_MIN) | (r > R_MAX))
    r = torch.where(torch.isnan(r), 1.0, r).clamp(R_MIN, R_MAX)
    r = torch.where(active, r, 1.0)
    s2 = 1 + r
    scale = torch.where(s2.abs() > delta, geometric_sum(r, K) / s2, 1.0)
    scale = torch.where(torch.isfinite(scale), scale, 1.0).clamp(1.0, scale_cap(K))
    return torch.where(active, scale, 1.0), r, active, clipped


def extrapolate_reference(theta0, theta2, g0, g1, *, K: int, alpha: float, delta: float = DELTA):
    """theta_tilde = theta0 + alpha * scale * (theta2 - theta0), and the diagnostics' sums."""
    scale, r, active, clipped = retention_scale(g0, g1, K, delta)
    d = theta2 - theta0
    theta_tilde = theta0 + alpha * scale * d
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    scale_max = scale.max() if scale.numel() else torch.ones((), dtype=r.dtype, device=r.device)
    sums = {
        "g0_sq": (g0 * g0).sum(), "g1_sq": (g1 * g1).sum(), "g0_g1": (g0 * g1).sum(),
        "n_active": active.sum().to(r.dtype), "r_sum": torch.where(active, r, zero).sum(),
        "r_sq": torch.where(active, r * r, zero).sum(), "n_clipped": clipped.sum().to(r.dtype),
        "scale_sum": torch.where(active, scale, zero).sum(), "scale_max": scale_max,
        "d_sq": (d * d).sum(), "scaled_d_sq": ((scale * d) ** 2).sum(),
    }
    return theta_tilde, torch.stack([sums[k] for k in EXTRAP_STATS])
