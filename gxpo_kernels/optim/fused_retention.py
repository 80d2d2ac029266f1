"""GXPO's retention in its authors' current spaces (optim/retention_step.py) inside FlatAdamW's two launches:
pass 1 sums each tensor's squared ratio denominator, one all-reduce turns the sums into per-tensor thresholds
(1e-3 RMS over the whole tensor, every FSDP shard), and pass 2 extrapolates with them
(optim/flat/adamw_kernel.py). No host read: the thresholds stay on the device."""

import math

import torch

from .flat.adamw_kernel import FUSED_SPACES, Retention
from .retention import RELATIVE_THRESHOLD, rms_of_sums


def pass1(groups, space: str) -> list:
    assert space in FUSED_SPACES, space
    return [Retention(space) for _ in groups]


def pass2(groups, space: str, den_sq: list, all_reduce, *, stepped: list, c0: float, c1: float,
          min_effective_multiplier: float) -> list:
    """One Retention per group for pass 2. den_sq: pass 1's per-tensor sums of squares, one [n_tensors] float64
    vector per group; all_reduce sums a float64 vector over the ranks; stepped: per group, one bool per tensor,
    whether pass 1 stepped it (a gradient and lr > 0). A tensor it did not step takes no ratio (an infinite
    threshold: scale 1), as the authors' step leaves the ratio out where it cannot read a direction. c0, c1: the
    clip multipliers of passes 1 and 2."""
    numels = [g.tables["numels"].to(torch.float64) for g in groups]
    totals = all_reduce(torch.cat([*den_sq, *numels]))
    sq, n = totals.split(totals.numel() // 2)
    thresholds = (RELATIVE_THRESHOLD * rms_of_sums(sq, n)).float()
    r_scale = c1 / c0 if space == "grad" else 1.0  # r = (c1 g1) / (c0 g0), the clip multipliers as they record
    out = []
    for g, thr, flags in zip(groups, thresholds.split([len(g.params) for g in groups]), stepped, strict=True):
        if not all(flags):
            thr = torch.where(g.device_table(flags, torch.bool), thr, math.inf)
        out.append(Retention(space, thr, r_scale, min_effective_multiplier))
    return out
