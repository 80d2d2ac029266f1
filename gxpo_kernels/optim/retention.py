"""GXPO's retention estimators as its authors compute them now, in plain torch, one tensor at a time: the
reference that the rule's flat-buffer paths are checked against (github SwapniL-afk-now/final-gxpo at
1a301e16; Code/SFPO/verl/workers/actor/gxpo_state.py at d2afd2cf and dp_actor.py at 1a301e16).

- Coordinatewise (`coordinatewise_retention`): a coordinate is active where |den| > 1e-3 RMS(den), the
  RMS over the whole tensor (every FSDP shard); r = (num_scale num) / (den_scale den), clamped to
  [R_MIN, R_MAX] (NaN -> 1, flagged clipped with +-inf and the out-of-range); the scale S_K(r) / S_2(r),
  1 where |S_2| <= delta or non-finite, clamped to [1, K/2 + 1]; r = scale = 1 where inactive.
  In AdamW's own space den, num = d0, d1, the direction AdamW applied (`adamw_direction`: moments, bias
  correction, eps and the clipped gradient all in it). In the gradient space den, num = g0, g1 (raw) with
  the clip multipliers c0, c1 as den_scale, num_scale, the threshold on the raw |g0|.
- Per matrix (`update_space_retention`): rho = <u0, u1> / <u0, u0> for the two probe displacements
  (0 where u0 vanished), clamped to [-1, 1]; the scale S_K(rho) / S_2(rho) clamped to [0, K/2 + 1].
- `reposition`: theta_tilde = theta0 + max(alpha scale, min_effective_multiplier) (theta2 - theta0).

The work dtype is float64 when an input is, else float32, as theirs."""

import torch

from .flat.extrapolation import DELTA, R_MAX, R_MIN, scale_cap
from .flat.reference import geometric_sum

RELATIVE_THRESHOLD = 1e-3  # active coordinates: |den| > RELATIVE_THRESHOLD * RMS(den), per tensor
RHO_MIN, RHO_MAX = -1.0, 1.0
UPDATE_SCALE_MIN = 0.0

__all__ = ["RELATIVE_THRESHOLD", "adamw_direction", "adamw_direction_from_step", "coordinatewise_retention",
           "reposition", "rms_of_sums", "tensor_rms", "update_space_retention", "work_dtype"]


def work_dtype(*tensors) -> torch.dtype:
    """float64 when an input is, else float32 (the authors' work dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tensor_rms(x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(x^2)) of one whole tensor; under FSDP the authors sum ||x||^2 and the element count over
    the shard group first (the flat paths do the same)."""
    return x.to(work_dtype(x)).square().mean().sqrt()


def rms_of_sums(sq_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """RMS from a sum of squares and an element count, both summed over the shards first (0 for no element)."""
    return (sq_sum / count.clamp(min=1.0)).sqrt()


def _check_K(K: int):
    if K < 2:
        raise ValueError(f"K must be >= 2, got {K}")


def adamw_direction(theta_before, theta_after, lr: float, weight_decay: float) -> torch.Tensor:
    """d = ((1 - lr wd) theta_t - theta_{t+1}) / lr: the direction a decoupled-AdamW step applied (for
    torch's AdamW, m_hat / (sqrt(v_hat) + eps) of the clipped gradient)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0 to recover AdamW's direction, got {lr}")
    work = work_dtype(theta_before, theta_after)
    return (theta_before.to(work) * (1.0 - lr * weight_decay) - theta_after.to(work)) / lr


def adamw_direction_from_step(theta_before, step, lr: float, weight_decay: float) -> torch.Tensor:
    """The same from the step u = theta_{t+1} - theta_t: -(u / lr) - wd theta_t (theta_{t+1} never formed)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0 to recover AdamW's direction, got {lr}")
    work = work_dtype(theta_before, step)
    return -(step.to(work) / lr) - theta_before.to(work) * weight_decay


def coordinatewise_retention(den, num, K: int, delta: float = DELTA, den_scale: float = 1.0, num_scale: float = 1.0,
                             den_rms=None) -> tuple:
    """(ratio, scale, active, clipped), each shaped as den; den_rms: RMS(den) over the whole tensor (its
    local RMS when None)."""
    _check_K(K)
    work = work_dtype(den, num)
    den_w, num_w = den.to(work), num.to(work)
    rms = tensor_rms(den_w) if den_rms is None else torch.as_tensor(den_rms, dtype=work)
    active = den_w.abs() > rms * RELATIVE_THRESHOLD
    candidate = (num_w * num_scale) / torch.where(active, den_w * den_scale, torch.ones_like(den_w))
    clipped = active & (~torch.isfinite(candidate) | (candidate < R_MIN) | (candidate > R_MAX))
    candidate = candidate.clamp(R_MIN, R_MAX).nan_to_num(nan=1.0)
    ratio = torch.where(active, candidate, torch.ones_like(candidate))
    s2 = geometric_sum(ratio, 2)
    active_scale = torch.where(s2.abs() > delta, geometric_sum(ratio, K) / s2, torch.ones_like(s2))
    active_scale = active_scale.nan_to_num(nan=1.0, posinf=1.0, neginf=1.0).clamp(1.0, scale_cap(K))
    scale = torch.where(active, active_scale, torch.ones_like(active_scale))
    return ratio, scale, active, clipped


def update_space_retention(cross, self_dot, K: int, delta: float = DELTA) -> tuple:
    """(rho, scale) of one matrix from cross = <u0, u1> and self_dot = <u0, u0> (sums over the whole matrix)."""
    _check_K(K)
    cross, self_dot = torch.as_tensor(cross), torch.as_tensor(self_dot)
    work = work_dtype(cross, self_dot)
    cross, self_dot = cross.to(work), self_dot.to(work)
    safe = self_dot > 0
    rho = torch.where(safe, cross / torch.where(safe, self_dot, torch.ones_like(self_dot)), torch.zeros_like(cross))
    rho = rho.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp(RHO_MIN, RHO_MAX)
    s2 = 1 + rho
    scale = torch.where(s2.abs() > delta, geometric_sum(rho, K) / s2, torch.ones_like(rho))
    scale = scale.nan_to_num(nan=1.0, posinf=1.0, neginf=1.0).clamp(UPDATE_SCALE_MIN, scale_cap(K))
    return rho, scale


def reposition(theta0, theta2, scale, alpha: float, min_effective_multiplier: float = 0.0) -> torch.Tensor:
    """theta_tilde = theta0 + eff (theta2 - theta0), eff = alpha scale, at least min_effective_multiplier
    when that is > 0; in the work dtype of theta0 and theta2."""
    work = work_dtype(theta0, theta2)
    eff = torch.as_tensor(scale, dtype=work) * alpha
    if min_effective_multiplier > 0:
        eff = eff.clamp(min=min_effective_multiplier)
    return (theta2.to(work) - theta0.to(work)) * eff + theta0.to(work)
