"""Plain PyTorch reference of the GRPO token-level clipped loss: the tests' oracle.

Same math as the Triton kernels, written the obvious way with autograd; works in float64. Tests and
benchmarks compare the kernels against it; the CPU path of the loss is rows.py's torch rows.
"""

import torch


def grpo_per_token_reference(
    logits_NV, ids_N, adv_N, old_logp_N=None, ref_logp_N=None, *,
    temperature=1.0, eps_low=0.2, eps_high=0.2, dual_clip_c=None, beta=0.0, with_entropy=True,
    log_ratio_clamp=None,
):
    """Per-token loss and statistics; `loss` is differentiable w.r.t. logits_NV. A zero-advantage
    token's policy term is 0 even where its ratio overflows; log_ratio_clamp clamps logp - old_logp
    before exp (verl's default: 20)."""
    z_NV = logits_NV / temperature
    logp_N = torch.log_softmax(z_NV, dim=-1).gather(-1, ids_N[:, None]).squeeze(-1)
    old = logp_N.detach() if old_logp_N is None else old_logp_N.to(logp_N.dtype)
    adv_N = adv_N.to(logp_N.dtype)
    log_ratio_N = logp_N - old
    if log_ratio_clamp is not None:
        log_ratio_N = torch.clamp(log_ratio_N, -log_ratio_clamp, log_ratio_clamp)
    zero_adv = adv_N == 0
    # exp of 0 (not of an overflowing log-ratio) where the advantage is zero, so no inf * 0 reaches autograd
    ratio_N = torch.exp(torch.where(zero_adv, 0.0, log_ratio_N))
    unclipped = ratio_N * adv_N
    clipped = torch.clamp(ratio_N, 1 - eps_low, 1 + eps_high) * adv_N
    loss_N = -torch.minimum(unclipped, clipped)
    clip_dual_N = torch.zeros_like(loss_N, dtype=torch.bool)
    if dual_clip_c is not None:
        dual_N = -dual_clip_c * adv_N
        clip_dual_N = (adv_N < 0) & (dual_N < loss_N)
        loss_N = torch.where(clip_dual_N, dual_N, loss_N)
    kl_N = torch.zeros_like(loss_N)
    if ref_logp_N is not None:
        diff_N = ref_logp_N.to(logp_N.dtype) - logp_N
        kl_N = torch.exp(diff_N) - diff_N - 1
        loss_N = loss_N + beta * kl_N
    entropy_N = torch.zeros_like(loss_N)
    if with_entropy:
        with torch.no_grad():
            p_NV = torch.softmax(z_NV, dim=-1)
            entropy_N = -(p_NV * torch.log_softmax(z_NV, dim=-1)).nan_to_num().sum(-1)
    r = torch.where(zero_adv, torch.exp(log_ratio_N.detach()), ratio_N.detach())
    return {
        "loss": loss_N,
        "logp": logp_N.detach(),
        "ratio": r,
        "kl": kl_N.detach(),
        "entropy": entropy_N,
        "clip_low": ((adv_N < 0) & (r < 1 - eps_low)).to(r.dtype),
        "clip_high": ((adv_N > 0) & (r > 1 + eps_high)).to(r.dtype),
        "clip_dual": clip_dual_N.to(r.dtype),
    }


def aggregate_reference(loss_BT, mask_BT, loss_agg, max_completion_len=None):
    mask_BT = mask_BT.to(loss_BT.dtype)
    B = loss_BT.shape[0]
    if loss_agg == "token-mean":
        return (loss_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return ((loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum() / B
    if loss_agg == "seq-mean-token-sum":
        return (loss_BT * mask_BT).sum() / B
    if loss_agg == "seq-mean-token-sum-norm":
        return (loss_BT * mask_BT).sum() / (B * max_completion_len)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def grpo_loss_reference(
    logits_BTV, completion_ids_BT, advantages_B, completion_mask_BT,
    old_logp_BT=None, ref_logp_BT=None, beta=0.0,
    eps_low=0.2, eps_high=0.2, dual_clip_c=None, temperature=1.0,
    loss_agg="token-mean", max_completion_len=None, return_entropy=False, log_ratio_clamp=None,
):
    """The whole grpo_loss API in plain torch, on [B, T] tensors, without input validation."""
    B, T, V = logits_BTV.shape
    adv_BT = advantages_B if advantages_B.dim() == 2 else advantages_B[:, None].expand(B, T)
    flat = lambda x: None if x is None else x.reshape(B * T)  # noqa: E731
    tok = grpo_per_token_reference(
        logits_BTV.reshape(B * T, V), completion_ids_BT.reshape(B * T), flat(adv_BT),
        flat(old_logp_BT), flat(ref_logp_BT), temperature=temperature, eps_low=eps_low,
        eps_high=eps_high, dual_clip_c=dual_clip_c, beta=beta, with_entropy=return_entropy,
        log_ratio_clamp=log_ratio_clamp,
    )
    mask_BT = completion_mask_BT.to(tok["logp"].dtype)
    loss = aggregate_reference(tok["loss"].reshape(B, T), mask_BT, loss_agg, max_completion_len)
    n_tokens = mask_BT.sum().clamp(min=1)
    mean = lambda name: (tok[name].reshape(B, T) * mask_BT).sum() / n_tokens  # noqa: E731
    metrics = {
        "clip_frac_low": mean("clip_low"),
        "clip_frac_high": mean("clip_high"),
        "ratio_mean": mean("ratio"),
        "logp_BT": tok["logp"].reshape(B, T) * mask_BT,
    }
    if dual_clip_c is not None:
        metrics["clip_frac_dual"] = mean("clip_dual")
    if ref_logp_BT is not None:
        metrics["kl_mean"] = mean("kl")
    if return_entropy:
        metrics["entropy_mean"] = mean("entropy")
    return loss, metrics
