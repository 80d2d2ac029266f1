"""CAPO (Melo, Abate, Gal 2025, arXiv 2510.00819): curvature-aware token masking on the LM head (the
token-mask slot), computed without autograd before the update. Each completion token's predicted change of the
objective (m_H) and predicted KL (m_F) under one AdamW step on its own LM-head gradient (top-K rows)
come from gxpo_kernels.ops.capo.capo_scores; tokens with m_F >= tau_F or |m_H| >= tau_H leave the loss
and its token count. Our reading where the paper is silent: the preconditioner is the base optimizer's
own running second moment of the LM-head weight (bias-corrected, per element, i.e. what AdamW divides
by). Before the first optimizer step there are no moments and no token is masked; with a frozen LM head
(LoRA) there never are, so CAPO refuses to run there."""

import dataclasses

import torch

from gxpo_kernels.ops.capo import capo_scores

from ..step import base_optimizer

QUANTILES = (0.5, 0.9, 0.99)


def lm_head_preconditioner(rule, head_weight: torch.Tensor, eps: float) -> tuple:
    """(1 / (sqrt(v_hat) + eps) as [V, H] float32 or None before the first step, the head's learning rate)."""
    opt = base_optimizer(rule)
    group = next((g for g in opt.param_groups if any(p is head_weight for p in g["params"])), None)
    if group is None:
        raise ValueError("capo models the LM head's optimizer step, but the LM head is not trained here "
                         "(frozen, or LoRA); turn capo off or train the head")
    state = opt.state.get(head_weight, {})
    if "exp_avg_sq" not in state:
        return None, group["lr"]
    step = float(state["step"])
    v_hat = state["exp_avg_sq"].float() / (1 - group["betas"][1] ** step)
    return 1 / (v_hat.sqrt() + eps), group["lr"]


@torch.no_grad()
def capo_token_mask(runner, batch, adv, rule, cfg, world: int = 1):
    """(batch with the rejected tokens out of completion_mask, stats)."""
    if world > 1:
        raise ValueError("capo under FSDP (several ranks) is not supported yet: it needs the full LM head and "
                         "its optimizer moments on every rank; run it on one GPU")
    c = cfg.capo
    mask_BT = batch.completion_mask
    hidden_BTH, head = runner("completion_hidden", batch)
    precond_VH, lr = lm_head_preconditioner(rule, head.weight, c.eps)
    if precond_VH is None:
        return batch, {"capo/rejected_frac": 0.0}
    adv_BT = adv[:, None].expand_as(mask_BT) if adv.dim() == 1 else adv
    m_H, m_F = capo_scores(hidden_BTH[mask_BT], head.weight, batch.completion_ids[mask_BT],
                           adv_BT.to(hidden_BTH.device)[mask_BT], precond_VH.to(head.weight.dtype), lr,
                           top_k=c.top_k, temperature=cfg.rollout.temperature, chunk_tokens=c.chunk_tokens)
    keep = (m_F < c.tau_F) & (m_H.abs() < c.tau_H)
    new_mask = mask_BT.clone()
    new_mask[mask_BT] = keep
    stats = {"capo/rejected_frac": 1 - keep.float().mean().item() if keep.numel() else 0.0}
    if keep.numel():
        for name, values in (("m_H", m_H.abs()), ("m_F", m_F)):
            qs = torch.quantile(values.double().cpu(), torch.tensor(QUANTILES, dtype=torch.float64))
            stats.update({f"capo/{name}_q{int(100 * q)}": v for q, v in zip(QUANTILES, qs.tolist(), strict=True)})
    return dataclasses.replace(batch, completion_mask=new_mask), stats
