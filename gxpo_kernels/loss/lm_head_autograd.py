"""GRPO loss fused with the LM head, two autograd Functions:

- tiled (TiledLMHeadGRPOLossFunction): the logits never reach memory (lm_head_kernels.py);
  peak extra memory O(N) plus fp32 gradient accumulators; the backward recomputes the logit tiles.
- chunked (ChunkedLMHeadGRPOLossFunction): logits_chunk = hidden_chunk @ W^T (+ b) in memory, the loss
  kernel turns them into dlogits in place, and d_hidden, d_weight, d_bias are accumulated right away.
  Peak extra memory O(chunk_tokens x V). The backward only rescales the stored gradients by grad_output.
"""

import torch
import triton

from .. import backend
from .grpo_terms import token_terms
from .lm_head_kernels import lm_head_grads, lm_head_lse
from .logits_autograd import scale_grad_, take_saved_grads
from .rows import grpo_rows
from .settings import STAT_NAMES


def default_chunk_tokens(N: int, V: int, H: int) -> int:
    # Chunk logits about the size of the hidden states (as Liger's fused linear cross-entropy does),
    # kept in [256, 2048] rows so that each chunk matmul stays efficient and its logits small.
    chunks = triton.cdiv(V, H)
    return min(N, max(256, min(2048, triton.next_power_of_2(triton.cdiv(N, chunks)))))


class ChunkedLMHeadGRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_N, adv_N, weight_N, old_N, ref_N, cfg, chunk_tokens):
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_grad = need_hidden or need_weight or need_bias
        stats_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
        stats = backend.empty(len(STAT_NAMES), N, dtype=stats_dtype, device=hidden_NH.device)
        grad_hidden = backend.empty(N, H, dtype=hidden_NH.dtype, device=hidden_NH.device) if need_hidden else None
        grad_weight = torch.zeros_like(weight_VH) if need_weight else None
        grad_bias = torch.zeros(V, dtype=stats_dtype, device=hidden_NH.device) if need_bias else None
        chunk_tokens = chunk_tokens or default_chunk_tokens(N, V, H)
        for start in range(0, N, chunk_tokens):
            end = min(start + chunk_tokens, N)
            hidden_CH = hidden_NH[start:end]
            if bias_V is None:
                logits_CV = hidden_CH @ weight_VH.t()
            else:
                logits_CV = torch.addmm(bias_V, hidden_CH, weight_VH.t())
            rows = slice(start, end)
            stats_chunk, dlogits = grpo_rows(
                logits_CV.unsqueeze(0), ids_N[rows], adv_N[rows], weight_N[rows],
                None if old_N is None else old_N[rows], None if ref_N is None else ref_N[rows],
                cfg, compute_grad=compute_grad, inplace=True,
            )
            stats[:, start:end] = stats_chunk
            if not compute_grad:
                continue
            dlogits_CV = dlogits.view(end - start, V)
            if need_hidden:
                torch.mm(dlogits_CV, weight_VH, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(dlogits_CV.t(), hidden_CH)
            if need_bias:
                grad_bias += dlogits_CV.sum(0, dtype=stats_dtype)
        ctx.saved_grads = (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias_V.dtype))
        ctx.mark_non_differentiable(stats)
        return (weight_N.to(stats_dtype) * stats[0]).sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grads = take_saved_grads(ctx, "fused_linear_grpo_loss")
        return (*(scale_grad_(g, grad_loss) for g in grads), None, None, None, None, None, None, None)


class TiledLMHeadGRPOLossFunction(torch.autograd.Function):
    """Forward: lse, target logit and entropy from logit tiles, then the GRPO math on [N] vectors; the
    backward recomputes the tiles (grad_output folded in on the device)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_N, adv_N, weight_N, old_N, ref_N, cfg, filter_eps):
        lse_N, target_N, entropy_N = lm_head_lse(hidden_NH, weight_VH, bias_V, ids_N, cfg.temperature,
                                                 cfg.with_entropy)
        logp_N = target_N - lse_N
        per_row, dloss_dlogp_N = token_terms(logp_N, adv_N.float(), None if old_N is None else old_N.float(),
                                             None if ref_N is None else ref_N.float(), cfg)
        if entropy_N is not None:
            per_row["entropy"] = entropy_N
        stats = torch.stack([per_row[k] for k in STAT_NAMES])
        weight_N = weight_N.float()
        coef_N = weight_N * dloss_dlogp_N / cfg.temperature
        ctx.needs = tuple(ctx.needs_input_grad[:3])
        if any(ctx.needs):
            ctx.save_for_backward(hidden_NH, weight_VH, bias_V, ids_N, coef_N, lse_N)
        ctx.cfg, ctx.filter_eps = cfg, filter_eps
        ctx.mark_non_differentiable(stats)
        return (weight_N * stats[0]).sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        hidden_NH, weight_VH, bias_V, ids_N, coef_N, lse_N = ctx.saved_tensors
        grads = lm_head_grads(hidden_NH, weight_VH, bias_V, ids_N, coef_N, lse_N,
                              grad_loss.reshape(1).to(torch.float32), ctx.cfg.temperature, ctx.needs,
                              ctx.filter_eps)
        return (*grads, None, None, None, None, None, None, None)
