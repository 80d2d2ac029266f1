"""GXPO's retention in its authors' current spaces (optim/retention_step.py) inside FlatAdamW's two launches:
pass 1 sums each tensor's squared ratio denominator, one all-reduce turns the sums into per-tensor thresholds
(1e-3 RMS over the whole tensor, every FSDP shard), and pass 2 extrapolates with them
(optim/flat/adamw_kernel.py). No host read: the thresholds stay on the device."""

import torch

from .flat.adamw_kernel import Retention
from .retention import RELATIVE_THRESHOLD
from .retention_step import clip_multiplier

FUSED_SPACES = ("grad", "update")


def pass1(groups, space: str) -> list:
    assert space in FUSED_SPACES, space
    return [Retention(space) for _ in groups]


def pass2(groups, space: str, den_sq: list, all_reduce, *, g0_norm: float, g1_norm: float, max_grad_norm,
          min_effective_multiplier: float) -> list:
    """One Retention per group for pass 2. den_sq: pass 1's per-tensor sums of squares, one [n_tensors] float64
    vector per group; all_reduce sums a float64 vector over the ranks."""
    numels = [g.tables["numels"].to(torch.float64) for g in groups]
    totals = all_reduce(torch.cat([*den_sq, *numels]))
    sq, n = totals.split(totals.numel() // 2)
    thresholds = (RELATIVE_THRESHOLD * (sq / n.clamp(min=1.0)).sqrt()).float()
    r_scale = 1.0
    if space == "grad":  # r = (c1 g1) / (c0 g0), the clip multipliers as the authors record them
        r_scale = clip_multiplier(g1_norm, max_grad_norm) / clip_multiplier(g0_norm, max_grad_norm)
    return [Retention(space, thr, r_scale, min_effective_multiplier)
            for thr in thresholds.split([len(g.params) for g in groups])]
