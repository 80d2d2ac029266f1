"""The vocabulary primitive: per token, the log-prob of its target under softmax(z / T) and the entropy of that
distribution, differentiable, from logits or fused with the LM head. Its backward takes a coefficient per
token for each output: dL/dz_j = (g_logp (onehot_j - p_j) - g_H p_j (log p_j + H)) / T. Any objective written on
the [B, T] vectors it returns (objectives.py) then trains through the same kernels, with no [N, V] tensor
beyond the logits themselves (none at all fused with the LM head). Masked tokens get log-prob 0 and entropy 0
and take no gradient; with with_entropy=False the entropy is not computed and takes no gradient."""

import torch

from .. import backend
from .lm_head_autograd import default_chunk_tokens
from .lm_head_kernels import lm_head_grads, lm_head_lse
from .logits_kernels import triton_pass1, triton_pass2
from .settings import STAT_NAMES, LossParams

_LOGP, _ENTROPY = STAT_NAMES.index("logp"), STAT_NAMES.index("entropy")


def _coefs(grad_logp_N, grad_entropy_N, like_N, temperature, active_N=None):
    """Per-token coefficients of the backward kernels: 1 / T folded in, zero at masked tokens (active_N 0)."""
    def coef(grad_N):
        c_N = grad_N.float() / temperature
        return (c_N if active_N is None else c_N * active_N).contiguous()

    c_N = torch.zeros_like(like_N, dtype=torch.float32) if grad_logp_N is None else coef(grad_logp_N)
    return c_N, None if grad_entropy_N is None else coef(grad_entropy_N)


def _torch_logq(logits_nV, temperature):
    acc = torch.float64 if logits_nV.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits_nV.to(acc) / temperature, -1)


class LogitsTokenLogprobs(torch.autograd.Function):
    """Forward: one read of the logits per token (Triton's pass 1, or torch ops); backward: one more read and
    a write of dlogits (in place of the logits when allowed)."""

    @staticmethod
    def forward(ctx, logits_BTV, ids_N, active_N, temperature, with_entropy, inplace):
        B, T, V = logits_BTV.shape
        ctx.temperature, ctx.inplace, ctx.triton = temperature, inplace, backend.use_triton(logits_BTV)
        ctx.with_entropy = with_entropy
        if ctx.triton:
            cfg = LossParams(temperature=temperature, with_entropy=with_entropy)
            zeros = torch.zeros_like(active_N)
            stats, _, lse_N = triton_pass1(logits_BTV, ids_N, zeros, active_N, None, None, cfg)
            logp_N, entropy_N = stats[_LOGP].clone(), stats[_ENTROPY].clone()
        else:
            rows = active_N.nonzero().squeeze(1)
            logq_nV = _torch_logq(logits_BTV.detach().reshape(B * T, V)[rows], temperature)
            acc = logq_nV.dtype
            logp_N = torch.zeros(B * T, dtype=acc, device=logits_BTV.device)
            entropy_N = torch.zeros(B * T, dtype=acc, device=logits_BTV.device)
            logp_N[rows] = logq_nV.gather(1, ids_N[rows, None]).squeeze(1)
            if with_entropy:
                entropy_N[rows] = -(logq_nV.exp() * logq_nV).sum(-1)
            lse_N = None
        ctx.save_for_backward(logits_BTV, ids_N, active_N, lse_N, entropy_N)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        logits_BTV, ids_N, active_N, lse_N, entropy_N = ctx.saved_tensors
        B, T, V = logits_BTV.shape
        grad_entropy_N = grad_entropy_N if ctx.with_entropy else None
        if ctx.triton:
            c_N, ch_N = _coefs(grad_logp_N, grad_entropy_N, active_N, ctx.temperature, active_N)
            one = torch.ones(1, dtype=torch.float32, device=logits_BTV.device)
            dlogits = triton_pass2(logits_BTV, ids_N, c_N, lse_N, one, LossParams(temperature=ctx.temperature),
                                   ctx.inplace, entropy_coef_N=ch_N, entropy_N=entropy_N)
            return dlogits, None, None, None, None, None
        rows = active_N.nonzero().squeeze(1)
        logq_nV = _torch_logq(logits_BTV.detach().reshape(B * T, V)[rows], ctx.temperature)
        p_nV = logq_nV.exp()
        g_n = (torch.zeros(rows.numel(), dtype=p_nV.dtype, device=p_nV.device) if grad_logp_N is None
               else grad_logp_N[rows].to(p_nV.dtype))
        grad_nV = -p_nV * g_n[:, None]
        grad_nV.scatter_add_(1, ids_N[rows, None], g_n[:, None])
        if grad_entropy_N is not None:
            h_n = entropy_N[rows].to(p_nV.dtype)
            grad_nV -= grad_entropy_N[rows].to(p_nV.dtype)[:, None] * p_nV * (logq_nV + h_n[:, None])
        dlogits = torch.zeros(B * T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
        dlogits.index_copy_(0, rows, (grad_nV / ctx.temperature).to(dlogits.dtype))
        return dlogits.view(B, T, V), None, None, None, None, None


class TiledLMHeadTokenLogprobs(torch.autograd.Function):
    """The logits never in memory: the forward's tiles give lse, the target logit and the entropy; the backward
    recomputes them with both coefficients (fp32 atomics into the gradients)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_N, temperature, with_entropy):
        lse_N, target_N, entropy_N = lm_head_lse(hidden_NH, weight_VH, bias_V, ids_N, temperature, with_entropy)
        entropy_N = torch.zeros_like(lse_N) if entropy_N is None else entropy_N
        ctx.needs, ctx.temperature, ctx.with_entropy = tuple(ctx.needs_input_grad[:3]), temperature, with_entropy
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, ids_N, lse_N, entropy_N)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        return target_N - lse_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, weight_VH, bias_V, ids_N, lse_N, entropy_N = ctx.saved_tensors
        c_N, ch_N = _coefs(grad_logp_N, grad_entropy_N if ctx.with_entropy else None, lse_N, ctx.temperature)
        grad_out = torch.ones(1, dtype=torch.float32, device=lse_N.device)
        grads = lm_head_grads(hidden_NH, weight_VH, bias_V, ids_N, c_N, lse_N, grad_out, ctx.temperature, ctx.needs,
                              entropy_coef_N=ch_N, entropy_N=entropy_N)
        return (*grads, None, None, None)


class ChunkedLMHeadTokenLogprobs(torch.autograd.Function):
    """chunk_tokens tokens at a time through a [chunk, V] logits buffer: the forward's GEMM and pass 1 per chunk
    (each chunk's lse and entropy kept, [chunk] each); the backward recomputes each chunk's logits, turns them
    into dlogits in place (pass 2) and accumulates the gradients (one GEMM more than a loss whose per-token
    coefficients are known in the forward)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_N, temperature, with_entropy, chunk_tokens):
        N, H = hidden_NH.shape
        V = weight_VH.shape[0]
        chunk_tokens = chunk_tokens or default_chunk_tokens(N, V, H)
        ones = torch.ones(N, dtype=torch.float32, device=hidden_NH.device)
        ctx.chunks, outs = [], []
        for s in range(0, N, chunk_tokens):
            chunk, rows = _Ctx(), slice(s, s + chunk_tokens)
            logits_1CV = _logits(hidden_NH[rows], weight_VH, bias_V)[None]
            outs.append(LogitsTokenLogprobs.forward(chunk, logits_1CV, ids_N[rows], ones[rows], temperature,
                                                    with_entropy, True))
            chunk.saved_tensors = (None, *chunk.saved[1:])  # the chunk's logits: recomputed in the backward
            ctx.chunks.append((rows, chunk))
        ctx.needs, ctx.with_entropy = tuple(ctx.needs_input_grad[:3]), with_entropy
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V)
        logp_N, entropy_N = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, weight_VH, bias_V = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs
        acc = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
        grad_hidden = torch.empty_like(hidden_NH) if need_hidden else None
        grad_weight = torch.zeros_like(weight_VH) if need_weight else None
        grad_bias = torch.zeros(weight_VH.shape[0], dtype=acc, device=hidden_NH.device) if need_bias else None
        grad_entropy_N = grad_entropy_N if ctx.with_entropy else None
        chunks, ctx.chunks = ctx.chunks, None
        for rows, chunk in chunks:
            hidden_CH = hidden_NH[rows]
            chunk.saved_tensors = (_logits(hidden_CH, weight_VH, bias_V)[None], *chunk.saved_tensors[1:])
            dlogits_CV = LogitsTokenLogprobs.backward(
                chunk, None if grad_logp_N is None else grad_logp_N[rows],
                None if grad_entropy_N is None else grad_entropy_N[rows])[0][0]
            if need_hidden:
                torch.mm(dlogits_CV, weight_VH, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(dlogits_CV.t(), hidden_CH)
            if need_bias:
                grad_bias += dlogits_CV.sum(0, dtype=acc)
        return (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias_V.dtype),
                None, None, None, None)


class _Ctx:
    """A stand-in autograd context: the chunked Function runs the logits Function's forward and backward on
    each chunk's logits buffer."""

    def save_for_backward(self, *tensors):
        self.saved = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _logits(hidden_CH, weight_VH, bias_V):
    return hidden_CH @ weight_VH.t() if bias_V is None else torch.addmm(bias_V, hidden_CH, weight_VH.t())
