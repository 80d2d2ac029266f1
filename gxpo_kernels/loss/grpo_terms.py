"""The per-token GRPO clipped loss in torch ops on [n] vectors: the math of the logits kernel's pass 1, shared by
the torch path (rows.py) and the tiled LM-head loss."""

import torch

from .settings import LossParams


def token_terms(logp, adv, old, ref, cfg: LossParams):
    """The per-token GRPO math of pass 1 in torch ops on [n] vectors: the statistics (entropy 0; the caller
    sets it) and d loss / d logp. Shared by the torch path and the tiled LM-head loss."""
    in_range = torch.ones_like(logp, dtype=torch.bool)
    if old is None:
        ratio = torch.ones_like(logp)
    else:
        log_ratio, c = logp - old, cfg.log_ratio_max
        in_range = log_ratio.abs() <= c
        ratio = torch.exp(log_ratio.clamp(-c, c))
    unclipped = torch.where(adv == 0, 0.0, ratio * adv)  # 0, not inf * 0, where the ratio overflowed
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    dloss_dratio = torch.where(unclipped <= clipped, -adv, 0.0)
    clip_dual = torch.zeros_like(loss)
    if cfg.dual_clip_c is not None:
        dual = -cfg.dual_clip_c * adv
        is_dual = (adv < 0) & (dual < loss)
        loss = torch.where(is_dual, dual, loss)
        dloss_dratio = torch.where(is_dual, 0.0, dloss_dratio)
        clip_dual = is_dual.to(loss.dtype)
    dloss_dlogp = torch.where((dloss_dratio == 0) | ~in_range, 0.0, dloss_dratio * ratio)
    kl = torch.zeros_like(loss)
    if ref is not None:
        diff = ref - logp
        kl = torch.exp(diff) - diff - 1
        loss = loss + cfg.beta * kl
        dloss_dlogp = dloss_dlogp + cfg.beta * (1 - torch.exp(diff))
    per_row = dict(loss=loss, logp=logp, ratio=ratio, kl=kl, entropy=torch.zeros_like(loss),
                   clip_low=((adv < 0) & (ratio < 1 - cfg.eps_low)).to(loss.dtype),
                   clip_high=((adv > 0) & (ratio > 1 + cfg.eps_high)).to(loss.dtype), clip_dual=clip_dual)
    return per_row, dloss_dlogp
