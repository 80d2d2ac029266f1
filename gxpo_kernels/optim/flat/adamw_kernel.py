"""AdamW over a flat group in one Triton launch (pointer tables for parameters, gradients and the two
moments; per-tensor lr, weight decay and bias corrections), optionally writing GXPO's pass-1 snapshot
(theta0 <- p, g0 <- raw gradient) while it reads them anyway: 8 B/param instead of a separate 16 B pass.
Same math as torch.optim.AdamW (decoupled weight decay, bias-corrected moments, eps outside the sqrt)
in fp32 registers; moments stored in their own dtype. A parameter without a gradient is left alone
(and snapshots g0 = 0), as torch skips it. For GXPO's pass 2 the same launch also extrapolates: theta2
never goes to memory, only theta_tilde does (8 B/param for theta0, g0 instead of a 20 B pass).

In the GXPO authors' current retention spaces (Retention) pass 1 also sums each block's squared ratio
denominator (the raw g0, or AdamW's direction d0) for the per-tensor RMS threshold, and pass 2 takes r in that
space: the update space's d0 is rebuilt from the moments pass 1 left (read anyway), d1 is this step's, so it
reads no g0 (4 B/param less) and keeps the raw g0 of the snapshot for the corrective pass's cos(g0, g~) and
the fallbacks."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ... import backend
from .buffers import FlatGroup, aligned
from .extrapolation import EXTRAP_STATS, kernel_scalars
from .ops import combine_stats
from .tiles import (
    add_stats,
    address,
    block_at,
    extrapolate_tile,
    launch_args,
    load,
    map_tables,
    num_programs,
    program_span,
    span_address_bits,
    store,
    store_stats,
    tile_index,
    valid_mask,
    zero_stats,
)


@triton.jit
def _adamw_tile(k, acc, den_sq, p_ptr, grad_ptrs, m_ptrs, v_ptrs, g_addr, t, start, off, numel, decay, step, bc1,
                bc2_sqrt, bc1_prev, bc2_sqrt_prev, thr, theta0_ptr, g0_ptr, beta1, beta2, eps, grad_scale, alpha, delta,
                scale_max, r_scale, min_eff, SNAPSHOT: tl.constexpr, EXTRAPOLATE: tl.constexpr,
                RELATIVE: tl.constexpr, DIRECTION: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr,
                ROWS: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Tile k of a block: AdamW, and the snapshot or the extrapolation; returns (acc, den_sq)."""
    idx = tile_index(start, k, ROWS, G)
    p = load(p_ptr, idx, numel, MASKED)
    x = p.to(tl.float32)
    g = tl.zeros([ROWS, G], tl.float32)
    d0 = tl.zeros([ROWS, G], tl.float32)  # DIRECTION: AdamW's direction before this step (pass 2: pass 1's)
    d = tl.zeros([ROWS, G], tl.float32)  # DIRECTION: the direction this step applies
    if g_addr != 0:
        g = load(address(grad_ptrs, t, DTYPE, ALIGNED), idx, numel, MASKED).to(tl.float32)
        gs = g * grad_scale
        m_ptr = address(m_ptrs, t, DTYPE, ALIGNED)
        v_ptr = address(v_ptrs, t, DTYPE, ALIGNED)
        m = load(m_ptr, idx, numel, MASKED).to(tl.float32)
        v = load(v_ptr, idx, numel, MASKED).to(tl.float32)
        if DIRECTION and EXTRAPOLATE:
            d0 = m / bc1_prev / (tl.sqrt(v) / bc2_sqrt_prev + eps)
        m = m + (1.0 - beta1) * (gs - m)
        v = beta2 * v + (1.0 - beta2) * gs * gs
        x = x * decay - step * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if DIRECTION:
            d = m / bc1 / (tl.sqrt(v) / bc2_sqrt + eps)
        store(m_ptr, idx, m.to(DTYPE), numel, MASKED)
        store(v_ptr, idx, v.to(DTYPE), numel, MASKED)
    if SNAPSHOT:
        store(theta0_ptr + off, idx, p, numel, MASKED)
        store(g0_ptr + off, idx, g.to(DTYPE), numel, MASKED)
        if RELATIVE:  # the retention ratio's denominator, squared, for its per-tensor RMS
            if DIRECTION:
                den_sq += tl.sum(d * d, 1)
            else:
                den_sq += tl.sum(g * g, 1)
    if EXTRAPOLATE:  # x is theta2 (kept in registers); g the raw g1, not the clipped one
        theta0 = load(theta0_ptr + off, idx, numel, MASKED).to(tl.float32)
        valid = valid_mask(idx, numel, MASKED)
        if DIRECTION:  # r = d1 / d0: AdamW's own space, d0 rebuilt from the moments pass 1 left
            x, stats = extrapolate_tile(x, theta0, d0, d, valid, alpha, delta, scale_max, thr, r_scale, min_eff,
                                        K, RELATIVE)
        else:
            g0 = load(g0_ptr + off, idx, numel, MASKED).to(tl.float32)
            x, stats = extrapolate_tile(x, theta0, g0, g, valid, alpha, delta, scale_max, thr, r_scale, min_eff,
                                        K, RELATIVE)
        acc = add_stats(acc, stats)
    store(p_ptr, idx, x.to(DTYPE), numel, MASKED)
    return acc, den_sq


@triton.jit
def _adamw_block(blk, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor, block_start, lr_t,
                 wd_t, bc1_t, bc2_sqrt_t, bc1_prev_t, bc2_sqrt_prev_t, lr_s, wd_s, bc1_s, bc2_sqrt_s, bc1_prev_s,
                 bc2_sqrt_prev_s, theta0_ptr, g0_ptr, den_sq_ptr, thr_ptr, beta1, beta2, eps, grad_scale, alpha, delta,
                 scale_max, r_scale, min_eff, PER_TENSOR: tl.constexpr, SNAPSHOT: tl.constexpr,
                 EXTRAPOLATE: tl.constexpr, RELATIVE: tl.constexpr, DIRECTION: tl.constexpr, K: tl.constexpr,
                 DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr,
                 MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    p_ptr = address(param_ptrs, t, DTYPE, ALIGNED)
    g_addr = tl.load(grad_ptrs + t)
    if PER_TENSOR:
        lr, wd, bc1, bc2_sqrt = tl.load(lr_t + t), tl.load(wd_t + t), tl.load(bc1_t + t), tl.load(bc2_sqrt_t + t)
        bc1_prev, bc2_sqrt_prev = tl.load(bc1_prev_t + t), tl.load(bc2_sqrt_prev_t + t)
    else:
        lr, wd, bc1, bc2_sqrt = lr_s, wd_s, bc1_s, bc2_sqrt_s
        bc1_prev, bc2_sqrt_prev = bc1_prev_s, bc2_sqrt_prev_s
    decay = 1.0 - lr * wd
    step = lr / bc1
    thr = delta
    if RELATIVE and EXTRAPOLATE:
        thr = tl.load(thr_ptr + t)
    den_sq = tl.zeros([ROWS], tl.float32)
    if DIRECTION and EXTRAPOLATE:  # a loop, not unrolled: two tiles' d0, d1 and theta0 at once spill (Triton 3.6)
        for k in range(BLOCK // (ROWS * G)):
            acc, den_sq = _adamw_tile(k, acc, den_sq, p_ptr, grad_ptrs, m_ptrs, v_ptrs, g_addr, t, start, off, numel,
                                      decay, step, bc1, bc2_sqrt, bc1_prev, bc2_sqrt_prev, thr, theta0_ptr, g0_ptr,
                                      beta1, beta2, eps, grad_scale, alpha, delta, scale_max, r_scale, min_eff,
                                      SNAPSHOT, EXTRAPOLATE, RELATIVE, DIRECTION, K, DTYPE, ROWS, G, ALIGNED, MASKED)
    else:
        for k in tl.static_range(BLOCK // (ROWS * G)):
            acc, den_sq = _adamw_tile(k, acc, den_sq, p_ptr, grad_ptrs, m_ptrs, v_ptrs, g_addr, t, start, off, numel,
                                      decay, step, bc1, bc2_sqrt, bc1_prev, bc2_sqrt_prev, thr, theta0_ptr, g0_ptr,
                                      beta1, beta2, eps, grad_scale, alpha, delta, scale_max, r_scale, min_eff,
                                      SNAPSHOT, EXTRAPOLATE, RELATIVE, DIRECTION, K, DTYPE, ROWS, G, ALIGNED, MASKED)
    if SNAPSHOT and RELATIVE:  # the block's sum: a reduction across warps, two barriers per 1024 elements
        tl.store(den_sq_ptr + blk, tl.sum(den_sq, 0))
    return acc


@triton.jit
def _adamw_kernel(param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor, block_start, num_full,
                  lr_t, wd_t, bc1_t, bc2_sqrt_t, bc1_prev_t, bc2_sqrt_prev_t, lr_s, wd_s, bc1_s, bc2_sqrt_s,
                  bc1_prev_s, bc2_sqrt_prev_s, theta0_ptr, g0_ptr, partial_ptr, den_sq_ptr, thr_ptr, beta1, beta2, eps,
                  grad_scale, alpha, delta, scale_max, r_scale, min_eff, PER_TENSOR: tl.constexpr,
                  SNAPSHOT: tl.constexpr, EXTRAPOLATE: tl.constexpr, RELATIVE: tl.constexpr, DIRECTION: tl.constexpr,
                  K: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                  BPP: tl.constexpr, ALIGNED: tl.constexpr):
    pid, n_full_programs, first, end = program_span(num_full, BPP)
    acc = zero_stats(ROWS)
    if pid < n_full_programs:
        vector_end = end  # blocks [first, vector_end) take 128-bit accesses, the rest 32-bit ones
        if not ALIGNED:
            bits = (span_address_bits(param_ptrs, block_tensor, first, end)
                    | span_address_bits(grad_ptrs, block_tensor, first, end)
                    | span_address_bits(m_ptrs, block_tensor, first, end)
                    | span_address_bits(v_ptrs, block_tensor, first, end))
            vector_end = tl.where(bits % 16 == 0, end, first)
        for blk in range(first, vector_end):
            acc = _adamw_block(blk, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor,
                               block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, bc1_prev_t, bc2_sqrt_prev_t, lr_s, wd_s,
                               bc1_s, bc2_sqrt_s, bc1_prev_s, bc2_sqrt_prev_s, theta0_ptr, g0_ptr, den_sq_ptr, thr_ptr,
                               beta1, beta2, eps, grad_scale, alpha, delta, scale_max, r_scale, min_eff, PER_TENSOR,
                               SNAPSHOT, EXTRAPOLATE, RELATIVE, DIRECTION, K, DTYPE, BLOCK, ROWS, G, True, False)
        if not ALIGNED:
            for blk in range(vector_end, end):
                acc = _adamw_block(blk, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor,
                                   block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, bc1_prev_t, bc2_sqrt_prev_t, lr_s, wd_s,
                                   bc1_s, bc2_sqrt_s, bc1_prev_s, bc2_sqrt_prev_s, theta0_ptr, g0_ptr, den_sq_ptr,
                                   thr_ptr, beta1, beta2, eps, grad_scale, alpha, delta, scale_max, r_scale, min_eff,
                                   PER_TENSOR, SNAPSHOT, EXTRAPOLATE, RELATIVE, DIRECTION, K, DTYPE, BLOCK, ROWS, G,
                                   False, False)
    else:
        acc = _adamw_block(num_full + pid - n_full_programs, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels,
                           offsets, block_tensor, block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, bc1_prev_t,
                           bc2_sqrt_prev_t, lr_s, wd_s, bc1_s, bc2_sqrt_s, bc1_prev_s, bc2_sqrt_prev_s, theta0_ptr,
                           g0_ptr, den_sq_ptr, thr_ptr, beta1, beta2, eps, grad_scale, alpha, delta, scale_max,
                           r_scale, min_eff, PER_TENSOR, SNAPSHOT, EXTRAPOLATE, RELATIVE, DIRECTION, K, DTYPE, BLOCK,
                           ROWS, G, False, True)
    if EXTRAPOLATE:
        store_stats(partial_ptr, pid, acc)


FUSED_SPACES = ("update", "grad")  # the retention spaces these launches compute (optim/retention_step.py)


@dataclass(frozen=True)
class Retention:
    """The retention ratio in the GXPO authors' current spaces (optim/retention_step.py), for the fused launches.
    space: "update" (r = d1 / d0, AdamW's applied directions: d0 rebuilt in pass 2 from the moments pass 1 left)
    or "grad" (r = r_scale g1 / g0 on the raw gradients, r_scale = c1 / c0 the clip multipliers). thresholds:
    pass 2's per-tensor activity threshold (1e-3 RMS of the denominator over the whole tensor), one float32 per
    tensor of the group on its device; pass 1 (snapshot) takes None and returns each tensor's sum of squares of
    the denominator."""

    space: str
    thresholds: torch.Tensor | None = None
    r_scale: float = 1.0
    min_effective_multiplier: float = 0.0


def adamw_step(group: FlatGroup, grads, exp_avgs, exp_avg_sqs, lr, weight_decay, bc1, bc2_sqrt, *, beta1: float,
               beta2: float, eps: float, grad_scale: float = 1.0, snapshot: bool = False, extrapolate=None,
               retention: Retention | None = None, bc1_prev=None, bc2_sqrt_prev=None):
    """One AdamW step over the group's parameters in one launch. grads/exp_avgs/exp_avg_sqs: local
    tensors per parameter (None where a parameter has no gradient); lr, weight_decay, bc1, bc2_sqrt:
    one float per parameter; the moments see grads * grad_scale. snapshot: also write group.theta0 and
    group.g0 (the raw gradients). extrapolate: {"K", "alpha", "delta"}: GXPO's pass 2, the parameters
    end at the extrapolated point from the AdamW result (with the raw gradients as g1) and the
    EXTRAP_STATS sums are returned. retention: the authors' current spaces (Retention) in place of
    r = g1 / g0 with |g0| > delta; with snapshot it returns the per-tensor sums of squares of the ratio's
    denominator (float64, [n_tensors]); the update space's pass 2 needs bc1_prev, bc2_sqrt_prev (pass 1's bias
    corrections, one float per parameter)."""
    if snapshot and extrapolate:
        raise ValueError("a step either takes the snapshot (pass 1) or extrapolates (pass 2)")
    direction = retention is not None and retention.space == "update"
    assert retention is None or retention.space in FUSED_SPACES, retention
    assert not (retention and extrapolate and retention.thresholds is None), "pass 2 needs the thresholds"
    assert not (direction and extrapolate and bc1_prev is None), "the update space's pass 2 needs pass 1's bc"
    n_stats = len(EXTRAP_STATS)
    if group.total == 0:
        return torch.zeros(len(group.params), dtype=torch.float64, device=group.device) if (snapshot and retention) \
            else None
    ex = extrapolate or {"K": 2, "alpha": 1.0, "delta": 1.0}
    if not (direction and extrapolate):  # only the update space's pass 2 reads them: constant tables, uploaded once
        bc1_prev = bc2_sqrt_prev = [1.0] * len(lr)
    # One (lr, weight decay, bias corrections) for every tensor that steps: kernel arguments, nothing to
    # upload. Otherwise per-tensor tables, uploaded only when their values change.
    stepping = [i for i, g in enumerate(grads) if g is not None]
    hyper = list(zip(lr, weight_decay, bc1, bc2_sqrt, bc1_prev, bc2_sqrt_prev, strict=True))
    shared = len({hyper[i] for i in stepping}) <= 1
    scalars = hyper[stepping[0]] if stepping else (0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    tables = [group.tables["numels"]] * 6 if shared else [
        group.device_table(xs, torch.float32) for xs in (lr, weight_decay, bc1, bc2_sqrt, bc1_prev, bc2_sqrt_prev)]
    programs = num_programs(group)
    partial = backend.empty(programs if extrapolate else 1, n_stats, dtype=torch.float32, device=group.device)
    den_sq = backend.empty(group.num_blocks if (snapshot and retention) else 1, dtype=torch.float32,
                           device=group.device)
    thresholds = retention.thresholds if (retention and extrapolate) else partial
    tensors = (group.local_params(), grads, exp_avgs, exp_avg_sqs)
    all_aligned = group.params_aligned and all(aligned(ts) for ts in tensors[1:])
    r_scale, min_eff = (retention.r_scale, retention.min_effective_multiplier) if retention else (1.0, 0.0)
    _adamw_kernel[(programs,)](
        *(group.pointer_table(ts) for ts in tensors), *map_tables(group), group.num_full, *tables,
        *(float(x) for x in scalars), group.theta0, group.g0, partial, den_sq, thresholds,
        float(beta1), float(beta2), float(eps), *kernel_scalars(ex["K"], ex["alpha"], ex["delta"], grad_scale),
        float(r_scale), float(min_eff), PER_TENSOR=not shared, SNAPSHOT=snapshot,
        EXTRAPOLATE=extrapolate is not None, RELATIVE=retention is not None, DIRECTION=direction, K=ex["K"],
        **launch_args(group, all_aligned))
    if snapshot and retention:
        per_tensor = torch.zeros(len(group.params), dtype=torch.float64, device=group.device)
        return per_tensor.index_add_(0, group.tables["block_tensor"], den_sq.double())
    return combine_stats(partial.double()) if extrapolate else None
