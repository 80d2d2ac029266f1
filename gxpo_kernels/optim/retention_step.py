"""GXPO's extrapolation in the retention spaces its authors run now (optim/retention.py), on the live
parameters one tensor at a time in torch (github SwapniL-afk-now/final-gxpo 1a301e16, dp_actor.py's
_gxpo_minibatch_step):

- raw_grad: r = g1 / g0 on raw gradients, |g0| > delta: the earlier code the presets `final` and `paper`
  follow; the flat kernels' path (optim/flat), not this module's.
- grad: r = (c1 g1) / (c0 g0) with the clip multipliers c = min(1, max_grad_norm / (||g|| + 1e-12)), active
  where the raw |g0| > 1e-3 RMS(g0) (their legacy space; the A/B baseline's).
- update: the base optimizer's own space. For decoupled AdamW, d_t = ((1 - lr wd) theta_t - theta_{t+1}) / lr
  reconstructed from the probe displacement u0 = theta1 - theta0 and theta2, r = d1 / d0, active where
  |d0| > 1e-3 RMS(d0).
- auto: update under decoupled AdamW, else grad with one warning (as theirs).

RMS is over the whole tensor: the local shards' sums of squares and element counts are summed over ranks
first. Buffers: theta0 and g0 (the flat snapshot) and one more per parameter, u0 (update) or the raw g1
(grad): three model-sized, as the authors keep. The fused FlatAdamW kernels cover raw_grad only; the other
spaces run their pass-2 AdamW step unfused and this module after it."""

import warnings

import torch

from .flat.buffers import local
from .flat.extrapolation import EXTRAP_STATS
from .retention import adamw_direction, adamw_direction_from_step, coordinatewise_retention, reposition, work_dtype

RETENTION_SPACES = ("raw_grad", "grad", "update", "auto")
CLIP_EPS = 1e-12  # their recorded clip multiplier min(1, clip / (||g|| + 1e-12))


def decoupled_adamw(base) -> bool:
    return isinstance(base, torch.optim.AdamW)


def resolve_space(space: str, base) -> str:
    """The space this base optimizer runs in: auto -> update (decoupled AdamW) or grad (one warning)."""
    if space == "update" and not decoupled_adamw(base):
        raise ValueError(f"retention_space = 'update' reads the step of a decoupled AdamW; {type(base).__name__} "
                         "is not one: use 'grad' or 'auto'")
    if space != "auto":
        return space
    if decoupled_adamw(base):
        return "update"
    warnings.warn(f"GXPO retention_space = 'auto': {type(base).__name__} is not a decoupled AdamW, so the retention "
                  "ratio is taken in the gradient space (r = c1 g1 / c0 g0)", stacklevel=4)
    return "grad"


def clip_multiplier(norm: float, max_grad_norm) -> float:
    return 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (abs(norm) + CLIP_EPS))


def hyperparameters(base) -> dict:
    """id(param) -> (lr, decoupled weight decay) as the base optimizer's groups hold them now."""
    return {id(p): (float(g["lr"]), float(g.get("weight_decay", g.get("wd", 0.0))))
            for g in base.param_groups for p in g["params"]}


class Probe:
    """The third model-sized buffer per parameter: u0 = theta1 - theta0 (update) or the raw g1 (grad)."""

    def __init__(self, space: str):
        self.space, self.bufs, self.hp0 = space, {}, {}

    def after_first_step(self, groups, base, had_grad):
        """theta1 is in place: u0 (update space) and the pass-1 hyperparameters."""
        self.hp0 = hyperparameters(base)
        if self.space != "update":
            return
        for g in groups:
            for j, p in enumerate(g.params):
                if id(p) in had_grad:
                    self.bufs[id(p)] = local(p).detach() - g.view(g.theta0, j)

    def after_second_backward(self, groups):
        """The raw (pre-clip) g1 (grad space)."""
        if self.space != "grad":
            return
        for g in groups:
            for p in g.params:
                if p.grad is not None:
                    self.bufs[id(p)] = local(p.grad).detach().clone()


def extrapolate(probe: Probe, groups, base, had_grad, *, K: int, alpha: float, delta: float, min_eff: float,
                c0: float, c1: float, all_reduce) -> torch.Tensor:
    """theta_tilde into the parameters (theta2 -> theta0 + eff (theta2 - theta0)); returns the EXTRAP_STATS
    sums of this rank (float64), in the retention space's own den / num."""
    hp1 = hyperparameters(base)
    items = []  # (group, index, param, den, num)
    for g in groups:
        for j, p in enumerate(g.params):
            if id(p) not in had_grad:
                continue
            theta0 = g.view(g.theta0, j)
            if probe.space == "grad":
                den, num = g.view(g.g0, j), probe.bufs[id(p)]
            else:
                (lr0, wd0), (lr1, wd1) = probe.hp0[id(p)], hp1[id(p)]
                if not (lr0 > 0 and lr1 > 0):  # their neutral branch: scale 1, no ratio
                    items.append((g, j, p, None, None))
                    continue
                u0 = probe.bufs[id(p)]
                den = adamw_direction_from_step(theta0, u0, lr0, wd0)
                num = adamw_direction(theta0 + u0, local(p).detach(), lr1, wd1)
            items.append((g, j, p, den, num))
    device = groups[0].device
    rows = [torch.stack([den.double().square().sum(), torch.tensor(float(den.numel()), dtype=torch.float64,
                                                                   device=den.device)]).to(device)
            for *_, den, _ in items if den is not None]
    totals = all_reduce(torch.stack(rows)) if rows else None
    index = {k: i for i, k in enumerate(EXTRAP_STATS)}
    sums = torch.zeros(len(EXTRAP_STATS), dtype=torch.float64, device=device)
    sums[index["scale_max"]] = 1.0
    row = 0
    for g, j, p, den, num in items:
        theta0, theta2 = g.view(g.theta0, j), local(p).detach()
        if den is None:
            scale = torch.ones((), dtype=work_dtype(theta2), device=theta2.device)
        else:
            rms = (totals[row, 0] / totals[row, 1].clamp(min=1.0)).sqrt()
            row += 1
            scale_c0, scale_c1 = (c0, c1) if probe.space == "grad" else (1.0, 1.0)
            ratio, scale, active, clipped = coordinatewise_retention(den, num, K, delta, scale_c0, scale_c1, rms)
            d, n, r = den.double(), num.double(), torch.where(active, ratio, 0).double()
            part = {"g0_sq": (d * d).sum(), "g1_sq": (n * n).sum(), "g0_g1": (d * n).sum(),
                    "n_active": active.sum().double(), "r_sum": r.sum(), "r_sq": (r * r).sum(),
                    "n_clipped": clipped.sum().double(), "scale_sum": torch.where(active, scale, 0).double().sum()}
            for k, v in part.items():
                sums[index[k]] += v.to(device)
            sums[index["scale_max"]] = torch.maximum(sums[index["scale_max"]], scale.max().double().to(device))
        disp2 = theta2.to(scale.dtype) - theta0.to(scale.dtype)
        sums[index["d_sq"]] += (disp2 * disp2).double().sum().to(device)
        sums[index["scaled_d_sq"]] += ((disp2 * scale) ** 2).double().sum().to(device)
        theta2.copy_(reposition(theta0, theta2, scale, alpha, min_eff).to(theta2.dtype))
    return sums
