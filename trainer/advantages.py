"""Advantage estimators: group-normalized GRPO (with or without the std, Dr. GRPO) is the default;
another estimator is any function (rewards [num_prompts, G]) -> (advantages [num_prompts * G], stats)."""

import torch


def group_normalized(rewards_PG: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """A = r - mean_group (divided by the group's std when scale_by_std). Zero-variance groups get
    A = 0 everywhere (they carry no signal) and are counted."""
    if not torch.isfinite(rewards_PG).all():
        raise ValueError("rewards contain NaN or inf; check the reward function")
    mean = rewards_PG.mean(dim=1, keepdim=True)
    std = rewards_PG.std(dim=1, keepdim=True) if rewards_PG.shape[1] > 1 else torch.zeros_like(mean)
    zero_var = (std < eps).squeeze(1)
    adv = rewards_PG - mean
    if scale_by_std:
        adv = adv / (std + eps)
    adv = torch.where(zero_var[:, None], 0.0, adv)
    return adv.reshape(-1), {"zero_variance_groups": int(zero_var.sum())}
