"""Per-token statistics and gradients from logits, both passes at once: the Triton kernels on CUDA (and under the
interpreter), the same math in torch ops elsewhere (CPU, float64). The chunked LM-head loss consumes them."""

import torch

from .. import backend
from .grpo_terms import token_terms
from .logits_kernels import triton_pass1, triton_pass2
from .settings import STAT_NAMES, LossParams


def torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, compute_grad):
    """The kernel's math in torch ops, on the unmasked rows only: the CPU and float64 path."""
    B, T, V = logits_BTV.shape
    acc = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    rows = (weight_N != 0).nonzero().squeeze(1)
    b, t = rows // T, rows % T
    logits = logits_BTV.detach()
    rows_per_b = logits.stride(0) // V
    if logits.stride(2) == 1 and logits.stride(1) == V and logits.stride(0) == rows_per_b * V:
        # every row is a V-run of one [*, V] matrix (also a causal LM's logits[:, :-1] slice): index_select
        matrix = logits.as_strided(((B - 1) * rows_per_b + T, V), (V, 1))
        logq_nV = matrix.index_select(0, b * rows_per_b + t).to(acc)
    else:
        logq_nV = logits[b, t].to(acc)
    if cfg.temperature != 1.0:
        logq_nV *= 1.0 / cfg.temperature
    logq_nV = torch.log_softmax(logq_nV, -1)
    ids_n = ids_N[rows, None]
    logp = logq_nV.gather(1, ids_n).squeeze(1)
    per_row, dloss_dlogp = token_terms(logp, adv_N[rows], None if old_N is None else old_N[rows],
                                       None if ref_N is None else ref_N[rows], cfg)
    p_nV = logq_nV.exp()
    if cfg.with_entropy:
        per_row["entropy"] = -torch.special.xlogy(p_nV, p_nV).sum(-1)
    stats = torch.zeros(len(STAT_NAMES), B * T, dtype=acc, device=logits_BTV.device)
    stats[:, rows] = torch.stack([per_row[k] for k in STAT_NAMES])
    dlogits = None
    if compute_grad:
        coef = weight_N[rows] * dloss_dlogp / cfg.temperature
        grad_nV = p_nV.mul_(-coef[:, None]).scatter_add_(1, ids_n, coef[:, None])
        # contiguous whatever the logits' strides; no in-place reuse here: it only costs time on CPU
        dlogits = torch.zeros(B, T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
        dlogits.view(B * T, V).index_copy_(0, rows, grad_nV.to(dlogits.dtype))
    return stats, dlogits


def grpo_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg: LossParams, compute_grad: bool,
              inplace: bool = False, block_v: int | None = None):
    """Per-token statistics [len(STAT_NAMES), N] and, if compute_grad, d(sum_t w_t loss_t)/dlogits, both
    passes at once (the fused-linear loss consumes each chunk's gradient right away)."""
    if backend.use_triton(logits_BTV):
        stats, coef_N, lse_N = triton_pass1(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, block_v)
        if not compute_grad:
            return stats, None
        one = torch.ones(1, dtype=torch.float32, device=logits_BTV.device)
        return stats, triton_pass2(logits_BTV, ids_N, coef_N, lse_N, one, cfg, inplace, block_v)
    return torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, compute_grad)
