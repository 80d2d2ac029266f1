"""GRPO token-level clipped loss from logits: the Triton kernels and their launchers (the autograd layer
is logits_autograd.py).

One program per token row (a 1-D grid, so any number of tokens). Pass 1 (forward) reads the row once:
an online log-sum-exp over in-thread groups (and entropy), the per-token loss and statistics, and the row's gradient
coefficient. Pass 2 (backward) reads it again and writes dlogits, grad_output folded into the
coefficient (read on the device), in place of the logits if the caller allows: read, read, write of
[N, V] per training step whatever grad_output is. Rows with zero weight (masked tokens) skip pass 1 and
only write their zero gradient in pass 2.
"""

import torch
import triton
import triton.language as tl

from .. import backend
from .settings import STAT_NAMES

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
    ent_coef_ptr=None, entropy_ptr=None, HAS_ENT: tl.constexpr = False,
):
    """Pass 2: dlogits_j = grad_out * (coef * (onehot_j - p_j) - ent_coef * p_j (log p_j + H)) (the entropy
    term with HAS_ENT: the vocabulary primitive's entropy gradient); zero coefficients (masked row) only write
    zeros. grad_out is read from device memory: no host sync, no separate rescale pass."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    dlogits_row = dlogits_ptr + b * stride_db + t * stride_dt
    cols = tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + row) * tl.load(grad_out_ptr).to(tl.float32)
    if HAS_ENT:
        ent_coef = tl.load(ent_coef_ptr + row) * tl.load(grad_out_ptr).to(tl.float32)
        ent = tl.load(entropy_ptr + row)
        skip = (coef == 0.0) & (ent_coef == 0.0)
    else:
        skip = coef == 0.0
    if skip:
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
            p = _exp2(z2 - lse2, FAST_EXP)
            grad = -coef * p
            if HAS_ENT:
                grad -= ent_coef * p * ((z2 - lse2) * _LN2 + ent)
            grad = tl.where(offs == token, grad + coef, grad)
            tl.store(dlogits_row + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=offs < V)


def default_block_v(V: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(V), 4096 if device.type == "cuda" else 1024)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


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
        log_ratio_max=cfg.log_ratio_max,
        num_warps=_num_warps(block_v),
    )
    return stats, coef_N, lse_N


def triton_pass2(logits_BTV, ids_N, coef_N, lse_N, grad_out, cfg, inplace, block_v=None, entropy_coef_N=None,
                 entropy_N=None):
    """dlogits = grad_out * d(sum_t w_t loss_t)/dlogits, over the logits (inplace) or into a new buffer;
    grad_out is a one-element device tensor. entropy_coef_N (with entropy_N): each row's coefficient of its
    entropy, 1 / T folded in as in coef_N."""
    B, T, V = logits_BTV.shape
    logits_BTV = _row_strided(logits_BTV)
    dlogits = logits_BTV if inplace else backend.empty(B, T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
    block_v = block_v or default_block_v(V, logits_BTV.device)
    _grpo_loss_bwd_kernel[(B * T,)](
        logits_BTV, logits_BTV.stride(0), logits_BTV.stride(1),
        dlogits, dlogits.stride(0), dlogits.stride(1),
        ids_N, coef_N, lse_N, grad_out, T, V, 1.0 / cfg.temperature,
        BLOCK_V=block_v, FAST_EXP=not backend.INTERPRET, num_warps=_num_warps(block_v),
        **({} if entropy_coef_N is None else dict(ent_coef_ptr=entropy_coef_N, entropy_ptr=entropy_N, HAS_ENT=True)),
    )
    return dlogits
