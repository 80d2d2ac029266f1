"""XRPO novelty-aware advantage sharpening (Bamba et al. 2025, arXiv 2510.06672). With s_i the mean token
log-prob of completion i and eta_i = exp(s_i - mean of s over its group),
    A_i <- A_i + min(max(l * (1 - eta_i), 0), k * A_i)   for A_i > 0 (l = 2.5, k = 0.5),
so correct but unlikely completions get up to k * A_i more; non-positive advantages are unchanged."""

import torch


def sharpen(adv_B: torch.Tensor, mean_logp_B: torch.Tensor, group_sizes: list, l: float = 2.5,
            k: float = 0.5) -> tuple:
    """(sharpened advantages [B], number of completions whose advantage grew)."""
    if sum(group_sizes) != adv_B.shape[0] or mean_logp_B.shape != adv_B.shape:
        raise ValueError(f"sharpen: group sizes {group_sizes} do not cover {adv_B.shape[0]} advantages")
    out = adv_B.clone()
    start = 0
    for n in group_sizes:
        s = mean_logp_B[start:start + n].double()
        eta = torch.exp(s - s.mean())
        a = adv_B[start:start + n].double()
        bonus = torch.minimum((l * (1 - eta)).clamp(min=0), k * a)
        out[start:start + n] = torch.where(a > 0, a + bonus, a).to(adv_B.dtype)
        start += n
    return out, int((out > adv_B).sum())

