"""The advantage slot. Default: group-normalized GRPO (with or without the std, Dr. GRPO) over groups of
any sizes. Plug-ins refine it afterwards: XRPO's novelty sharpening (sequence level) and GRPO-lambda's
eligibility traces (per token, [B, T]); see trainer/plugins/."""

import torch


def group_normalized(rewards_PG: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """Equal groups [num_prompts, G] -> (advantages [num_prompts * G], stats)."""
    return group_normalized_ragged(rewards_PG.reshape(-1), [rewards_PG.shape[1]] * rewards_PG.shape[0],
                                   scale_by_std, eps)


def group_normalized_ragged(rewards: torch.Tensor, group_sizes: list, scale_by_std: bool = True, eps: float = 1e-6):
    """A = r - mean_group (divided by the group's std when scale_by_std), groups of the given sizes laid
    out one after another. Zero-variance groups get A = 0 everywhere (they carry no signal) and are counted."""
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; check the reward function")
    if sum(group_sizes) != rewards.numel() or min(group_sizes, default=1) < 1:
        raise ValueError(f"group sizes {group_sizes} do not partition {rewards.numel()} rewards")
    adv, zero_var = torch.empty_like(rewards), 0
    start = 0
    for n in group_sizes:
        r = rewards[start:start + n]
        std = r.std() if n > 1 else torch.zeros(())
        a = r - r.mean()
        if scale_by_std:
            a = a / (std + eps)
        if std < eps:
            a, zero_var = torch.zeros_like(a), zero_var + 1
        adv[start:start + n] = a
        start += n
    return adv, {"zero_variance_groups": zero_var}
