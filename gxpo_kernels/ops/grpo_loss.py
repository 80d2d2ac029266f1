"""GRPO token-level clipped loss from logits: Triton kernels, launchers, autograd.Function.

One program per token row (a 1-D grid, so any number of tokens). Pass 1 (forward) reads the row once:
an online log-sum-exp over in-thread groups (and entropy), the per-token loss and statistics, and the row's gradient
coefficient. Pass 2 (backward) reads it again and writes dlogits, grad_output folded into the
coefficient (read on the device), in place of the logits if the caller allows: read, read, write of
[N, V] per training step whatever grad_output is. Rows with zero weight (masked tokens) skip pass 1 and
only write their zero gradient in pass 2.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import backend
from .loss_layout import STAT_NAMES


@dataclass(frozen=True)
class LossParams:
    """The loss's scalar settings as the kernels take them (validated by loss_inputs.make_config)."""

    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    beta: float = 0.0
    with_entropy: bool = False
    log_ratio_clamp: float | None = None  # verl's clamp of logp - old_logp before exp (their default: 20)


_LOG2E, _LN2 = tl.constexpr(1.4426950408889634), tl.constexpr(0.6931471805599453)  # Triton reads constexprs


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    """2^x; FAST_EXP: one MUFU.EX2 with subnormal results flushed to zero (tl.exp2 adds a subnormal guard
    of three instructions per element). The interpreter has no PTX, so it takes tl.exp2."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _grpo_loss_fwd_kernel(
    logits_ptr, stride_lb, stride_lt,
    ids_ptr, adv_ptr, weight_ptr, old_ptr, ref_ptr, stats_ptr, coef_ptr, lse_ptr,
    T, V, N, inv_temp, ratio_lo, ratio_hi, dual_c, beta,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, FAST_EXP: tl.constexpr, GROUP: tl.constexpr = 8,
    log_ratio_max=float("inf"),
):
    """Pass 1: per-token statistics, lse, and the row coefficient coef = w dloss/dlogp / temperature."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    w = tl.load(weight_ptr + row).to(tl.float32)

    if w == 0.0:
        for k in tl.static_range(8):
            tl.store(stats_ptr + k * N + row, 0.0)
        tl.store(coef_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        # Online log-sum-exp in base 2 (z2 = z * log2(e)) over [R, G] tiles whose G elements sit in one
        # thread: each group's max and sum need no cross-thread reduction and one exp2 per element; the
        # running (max, sum) of each of the R lanes absorbs a group with two exp2 per G elements.
        R: tl.constexpr = BLOCK_V // GROUP
        lanes = tl.arange(0, R)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m = tl.full([R], -1e30, tl.float32)
        s = tl.zeros([R], tl.float32)
        ez = tl.zeros([R], tl.float32)
        scale2 = inv_temp * _LOG2E
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            z2 = tl.load(logits_row + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * scale2
            m_g = tl.maximum(tl.max(z2, 1), -1e30)  # finite even for an all-masked group
            e = _exp2(z2 - m_g[:, None], FAST_EXP)
            m_new = tl.maximum(m, m_g)
            old_scale = _exp2(m - m_new, FAST_EXP)
            new_scale = _exp2(m_g - m_new, FAST_EXP)
            s = s * old_scale + tl.sum(e, 1) * new_scale
            if WITH_ENTROPY:
                ez = ez * old_scale + tl.sum(tl.where(e > 0.0, e * z2, 0.0), 1) * new_scale
            m = m_new
        m_row = tl.max(m, 0)
        lane_scale = tl.exp2(m - m_row)
        s_row = tl.sum(s * lane_scale, 0)
        lse = (m_row + tl.log2(s_row)) * _LN2

        token = tl.load(ids_ptr + row)
        logp = tl.load(logits_row + token).to(tl.float32) * inv_temp - lse
        adv = tl.load(adv_ptr + row).to(tl.float32)
        keep = 1.0  # 0 where verl's log-ratio clamp binds: no gradient through the ratio there
        if HAS_OLD:
            log_ratio = logp - tl.load(old_ptr + row).to(tl.float32)
            keep = tl.where((log_ratio >= -log_ratio_max) & (log_ratio <= log_ratio_max), 1.0, 0.0)
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -log_ratio_max), log_ratio_max))
        else:
            ratio = 1.0 + 0.0 * logp
        ratio_c = tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
        # A zero advantage contributes 0 even when the ratio overflowed (inf * 0 would be NaN).
        unclipped = tl.where(adv == 0.0, 0.0, ratio * adv)
        clipped = ratio_c * adv
        loss = -tl.minimum(unclipped, clipped)
        dloss_dratio = tl.where(unclipped <= clipped, -adv, 0.0)
        clip_dual = 0.0
        if HAS_DUAL:
            dual = -dual_c * adv
            is_dual = (adv < 0) & (dual < loss)
            loss = tl.where(is_dual, dual, loss)
            dloss_dratio = tl.where(is_dual, 0.0, dloss_dratio)
            clip_dual = is_dual.to(tl.float32)
        # d loss / d logp; a zero factor stays zero even when the ratio overflowed.
        dloss_dlogp = tl.where((dloss_dratio == 0.0) | (keep == 0.0), 0.0, dloss_dratio * ratio)
        kl = 0.0
        if HAS_REF:
            diff = tl.load(ref_ptr + row).to(tl.float32) - logp
            kl = tl.exp(diff) - diff - 1.0
            loss += beta * kl
            dloss_dlogp += beta * (1.0 - tl.exp(diff))
        entropy = 0.0
        if WITH_ENTROPY:
            entropy = lse - tl.sum(ez * lane_scale, 0) / s_row * _LN2

        tl.store(stats_ptr + 0 * N + row, loss)
        tl.store(stats_ptr + 1 * N + row, logp)
        tl.store(stats_ptr + 2 * N + row, ratio)
        tl.store(stats_ptr + 3 * N + row, kl)
        tl.store(stats_ptr + 4 * N + row, entropy)
        tl.store(stats_ptr + 5 * N + row, ((adv < 0) & (ratio < ratio_lo)).to(tl.float32))
        tl.store(stats_ptr + 6 * N + row, ((adv > 0) & (ratio > ratio_hi)).to(tl.float32))
        tl.store(stats_ptr + 7 * N + row, clip_dual)
        tl.store(coef_ptr + row, w * dloss_dlogp * inv_temp)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _grpo_loss_bwd_kernel(
    logits_ptr, stride_lb, stride_lt,
    dlogits_ptr, stride_db, stride_dt,
    ids_ptr, coef_ptr, lse_ptr, grad_out_ptr,
    T, V, inv_temp,
    BLOCK_V: tl.constexpr, FAST_EXP: tl.constexpr,
):
    """Pass 2: dlogits_j = grad_out * coef * (onehot_j - p_j); a zero coefficient (masked row) only writes
    zeros. grad_out is read from device memory: no host sync, no separate rescale pass."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    dlogits_row = dlogits_ptr + b * stride_db + t * stride_dt
    cols = tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + row) * tl.load(grad_out_ptr).to(tl.float32)
    if coef == 0.0:
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(dlogits_row + offs, zeros.to(dlogits_ptr.dtype.element_ty), mask=offs < V)
    else:
        scale2 = inv_temp * _LOG2E
        lse2 = tl.load(lse_ptr + row) * _LOG2E
        token = tl.load(ids_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z2 = tl.load(logits_row + offs, mask=offs < V, other=0.0).to(tl.float32) * scale2
            grad = -coef * _exp2(z2 - lse2, FAST_EXP)
            grad = tl.where(offs == token, grad + coef, grad)
            tl.store(dlogits_row + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=offs < V)


def default_block_v(V: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(V), 4096 if device.type == "cuda" else 1024)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _log_ratio_max(cfg: LossParams) -> float:
    return float("inf") if cfg.log_ratio_clamp is None else cfg.log_ratio_clamp


def _row_strided(logits_BTV):
    return logits_BTV if logits_BTV.stride(-1) == 1 else logits_BTV.contiguous()


def triton_pass1(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, block_v=None):
    """(stats [len(STAT_NAMES), N], coef [N], lse [N]) from one read of the logits."""
    B, T, V = logits_BTV.shape
    N = B * T
    logits_BTV = _row_strided(logits_BTV)
    dev = logits_BTV.device
    stats = backend.empty(len(STAT_NAMES), N, dtype=torch.float32, device=dev)
    coef_N, lse_N = backend.empty(N, dtype=torch.float32, device=dev), backend.empty(N, dtype=torch.float32, device=dev)
    block_v = block_v or default_block_v(V, dev)
    _grpo_loss_fwd_kernel[(N,)](
        logits_BTV, logits_BTV.stride(0), logits_BTV.stride(1),
        ids_N, adv_N, weight_N,
        old_N if old_N is not None else adv_N, ref_N if ref_N is not None else adv_N, stats, coef_N, lse_N,
        T, V, N, 1.0 / cfg.temperature, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high,
        cfg.dual_clip_c or 0.0, cfg.beta,
        HAS_OLD=old_N is not None, HAS_REF=ref_N is not None, HAS_DUAL=cfg.dual_clip_c is not None,
        WITH_ENTROPY=cfg.with_entropy, BLOCK_V=block_v, FAST_EXP=not backend.INTERPRET,
        log_ratio_max=_log_ratio_max(cfg),
        num_warps=_num_warps(block_v),
    )
    return stats, coef_N, lse_N


def triton_pass2(logits_BTV, ids_N, coef_N, lse_N, grad_out, cfg, inplace, block_v=None):
    """dlogits = grad_out * d(sum_t w_t loss_t)/dlogits, over the logits (inplace) or into a new buffer;
    grad_out is a one-element device tensor."""
    B, T, V = logits_BTV.shape
    logits_BTV = _row_strided(logits_BTV)
    dlogits = logits_BTV if inplace else backend.empty(B, T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
    block_v = block_v or default_block_v(V, logits_BTV.device)
    _grpo_loss_bwd_kernel[(B * T,)](
        logits_BTV, logits_BTV.stride(0), logits_BTV.stride(1),
        dlogits, dlogits.stride(0), dlogits.stride(1),
        ids_N, coef_N, lse_N, grad_out, T, V, 1.0 / cfg.temperature,
        BLOCK_V=block_v, FAST_EXP=not backend.INTERPRET, num_warps=_num_warps(block_v),
    )
    return dlogits


def token_terms(logp, adv, old, ref, cfg: LossParams):
    """The per-token GRPO math of pass 1 in torch ops on [n] vectors: the statistics (entropy 0; the caller
    sets it) and d loss / d logp. Shared by the torch path and the tiled LM-head loss."""
    in_range = torch.ones_like(logp, dtype=torch.bool)
    if old is None:
        ratio = torch.ones_like(logp)
    else:
        log_ratio, c = logp - old, _log_ratio_max(cfg)
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


def _torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, compute_grad):
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
    return _torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, compute_grad)


def take_saved_grads(ctx, what: str):
    """The gradients a loss Function computed in its forward, handed out once."""
    grads, ctx.saved_grads = ctx.saved_grads, None
    if grads is None:
        raise RuntimeError(f"{what}: backward ran twice; the gradient buffers were already handed out. "
                           "Recompute the loss for another backward.")
    return grads


def scale_grad_(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """grad * grad_output, in place; on an accelerator without a host sync (grad_output stays on the
    device), on CPU skipped when grad_output is 1."""
    if grad is None or (grad_output.device.type == "cpu" and bool(grad_output == 1)):
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


PASS2_IN_BACKWARD = object()  # the Triton path's saved "gradient": pass 2 runs in the backward


class GRPOLossFunction(torch.autograd.Function):
    """Triton: the forward reads the logits once (statistics, lse, row coefficients); the backward reads
    them again and writes dlogits with grad_output folded into each row's coefficient. Torch path: the
    gradient is computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, inplace, block_v):
        need_grad = ctx.needs_input_grad[0]
        ctx.cfg, ctx.inplace, ctx.block_v, ctx.saved_grads = cfg, inplace, block_v, None
        if backend.use_triton(logits_BTV):
            stats, coef_N, lse_N = triton_pass1(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, block_v)
            if need_grad:
                ctx.save_for_backward(logits_BTV, ids_N, coef_N, lse_N)
                ctx.saved_grads = PASS2_IN_BACKWARD
        else:
            stats, ctx.saved_grads = _torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, need_grad)
        ctx.mark_non_differentiable(stats)
        return (weight_N.to(stats.dtype) * stats[0]).sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        saved = take_saved_grads(ctx, "grpo_loss")
        if saved is PASS2_IN_BACKWARD:
            logits_BTV, ids_N, coef_N, lse_N = ctx.saved_tensors
            grad_out = grad_loss.reshape(1).to(torch.float32)
            dlogits = triton_pass2(logits_BTV, ids_N, coef_N, lse_N, grad_out, ctx.cfg, ctx.inplace, ctx.block_v)
        else:
            dlogits = scale_grad_(saved, grad_loss)
        return dlogits, None, None, None, None, None, None, None, None
