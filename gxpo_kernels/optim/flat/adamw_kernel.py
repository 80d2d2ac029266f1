"""AdamW over a flat group in one Triton launch (pointer tables for parameters, gradients and the two
moments; per-tensor lr, weight decay and bias corrections), optionally writing GXPO's pass-1 snapshot
(theta0 <- p, g0 <- raw gradient) while it reads them anyway: 8 B/param instead of a separate 16 B pass.
Same math as torch.optim.AdamW (decoupled weight decay, bias-corrected moments, eps outside the sqrt)
in fp32 registers; moments stored in their own dtype. A parameter without a gradient is left alone
(and snapshots g0 = 0), as torch skips it. For GXPO's pass 2 the same launch also extrapolates: theta2
never goes to memory, only theta_tilde does (8 B/param for theta0, g0 instead of a 20 B pass)."""

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
def _adamw_block(blk, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor, block_start, lr_t,
                 wd_t, bc1_t, bc2_sqrt_t, lr_s, wd_s, bc1_s, bc2_sqrt_s, theta0_ptr, g0_ptr, beta1, beta2, eps,
                 grad_scale, alpha, delta, scale_max, PER_TENSOR: tl.constexpr, SNAPSHOT: tl.constexpr,
                 EXTRAPOLATE: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    p_ptr = address(param_ptrs, t, DTYPE, ALIGNED)
    g_addr = tl.load(grad_ptrs + t)
    if PER_TENSOR:
        lr, wd, bc1, bc2_sqrt = tl.load(lr_t + t), tl.load(wd_t + t), tl.load(bc1_t + t), tl.load(bc2_sqrt_t + t)
    else:
        lr, wd, bc1, bc2_sqrt = lr_s, wd_s, bc1_s, bc2_sqrt_s
    decay = 1.0 - lr * wd
    step = lr / bc1
    for k in tl.static_range(BLOCK // (ROWS * G)):
        idx = tile_index(start, k, ROWS, G)
        p = load(p_ptr, idx, numel, MASKED)
        x = p.to(tl.float32)
        g = tl.zeros([ROWS, G], tl.float32)
        if g_addr != 0:
            g = load(address(grad_ptrs, t, DTYPE, ALIGNED), idx, numel, MASKED).to(tl.float32)
            gs = g * grad_scale
            m_ptr = address(m_ptrs, t, DTYPE, ALIGNED)
            v_ptr = address(v_ptrs, t, DTYPE, ALIGNED)
            m = load(m_ptr, idx, numel, MASKED).to(tl.float32)
            v = load(v_ptr, idx, numel, MASKED).to(tl.float32)
            m = m + (1.0 - beta1) * (gs - m)
            v = beta2 * v + (1.0 - beta2) * gs * gs
            x = x * decay - step * m / (tl.sqrt(v) / bc2_sqrt + eps)
            store(m_ptr, idx, m.to(DTYPE), numel, MASKED)
            store(v_ptr, idx, v.to(DTYPE), numel, MASKED)
        if SNAPSHOT:
            store(theta0_ptr + off, idx, p, numel, MASKED)
            store(g0_ptr + off, idx, g.to(DTYPE), numel, MASKED)
        if EXTRAPOLATE:  # x is theta2 (kept in registers); g the raw g1, not the clipped one
            theta0 = load(theta0_ptr + off, idx, numel, MASKED).to(tl.float32)
            g0 = load(g0_ptr + off, idx, numel, MASKED).to(tl.float32)
            x, stats = extrapolate_tile(x, theta0, g0, g, valid_mask(idx, numel, MASKED), alpha, delta, scale_max, K)
            acc = add_stats(acc, stats)
        store(p_ptr, idx, x.to(DTYPE), numel, MASKED)
    return acc


@triton.jit
def _adamw_kernel(param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor, block_start, num_full,
                  lr_t, wd_t, bc1_t, bc2_sqrt_t, lr_s, wd_s, bc1_s, bc2_sqrt_s, theta0_ptr, g0_ptr, partial_ptr, beta1,
                  beta2, eps, grad_scale, alpha, delta, scale_max, PER_TENSOR: tl.constexpr, SNAPSHOT: tl.constexpr,
                  EXTRAPOLATE: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  ROWS: tl.constexpr, G: tl.constexpr, BPP: tl.constexpr, ALIGNED: tl.constexpr):
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
                               block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, lr_s, wd_s, bc1_s, bc2_sqrt_s, theta0_ptr,
                               g0_ptr, beta1, beta2, eps, grad_scale, alpha, delta, scale_max, PER_TENSOR, SNAPSHOT,
                               EXTRAPOLATE, K, DTYPE, BLOCK, ROWS, G, True, False)
        if not ALIGNED:
            for blk in range(vector_end, end):
                acc = _adamw_block(blk, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor,
                                   block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, lr_s, wd_s, bc1_s, bc2_sqrt_s,
                                   theta0_ptr, g0_ptr, beta1, beta2, eps, grad_scale, alpha, delta, scale_max,
                                   PER_TENSOR, SNAPSHOT, EXTRAPOLATE, K, DTYPE, BLOCK, ROWS, G, False, False)
    else:
        acc = _adamw_block(num_full + pid - n_full_programs, acc, param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels,
                           offsets, block_tensor, block_start, lr_t, wd_t, bc1_t, bc2_sqrt_t, lr_s, wd_s, bc1_s,
                           bc2_sqrt_s, theta0_ptr, g0_ptr, beta1, beta2, eps, grad_scale, alpha, delta, scale_max,
                           PER_TENSOR, SNAPSHOT, EXTRAPOLATE, K, DTYPE, BLOCK, ROWS, G, False, True)
    if EXTRAPOLATE:
        store_stats(partial_ptr, pid, acc)


def adamw_step(group: FlatGroup, grads, exp_avgs, exp_avg_sqs, lr, weight_decay, bc1, bc2_sqrt, *, beta1: float,
               beta2: float, eps: float, grad_scale: float = 1.0, snapshot: bool = False, extrapolate=None):
    """One AdamW step over the group's parameters in one launch. grads/exp_avgs/exp_avg_sqs: local
    tensors per parameter (None where a parameter has no gradient); lr, weight_decay, bc1, bc2_sqrt:
    one float per parameter; the moments see grads * grad_scale. snapshot: also write group.theta0 and
    group.g0 (the raw gradients). extrapolate: {"K", "alpha", "delta"}: GXPO's pass 2, the parameters
    end at the extrapolated point from the AdamW result (with the raw gradients as g1) and the
    EXTRAP_STATS sums are returned."""
    if snapshot and extrapolate:
        raise ValueError("a step either takes the snapshot (pass 1) or extrapolates (pass 2)")
    n_stats = len(EXTRAP_STATS)
    if group.total == 0:
        return None
    ex = extrapolate or {"K": 2, "alpha": 1.0, "delta": 1.0}
    # One (lr, weight decay, bias corrections) for every tensor that steps: kernel arguments, nothing to
    # upload. Otherwise per-tensor tables, uploaded only when their values change.
    stepping = [i for i, g in enumerate(grads) if g is not None]
    hyper = list(zip(lr, weight_decay, bc1, bc2_sqrt, strict=True))
    shared = len({hyper[i] for i in stepping}) <= 1
    scalars = hyper[stepping[0]] if stepping else (0.0, 0.0, 1.0, 1.0)
    tables = [group.tables["numels"]] * 4 if shared else [group.device_table(xs, torch.float32)
                                                           for xs in (lr, weight_decay, bc1, bc2_sqrt)]
    programs = num_programs(group)
    partial = backend.empty(programs if extrapolate else 1, n_stats, dtype=torch.float32, device=group.device)
    tensors = (group.local_params(), grads, exp_avgs, exp_avg_sqs)
    all_aligned = group.params_aligned and all(aligned(ts) for ts in tensors[1:])
    _adamw_kernel[(programs,)](
        *(group.pointer_table(ts) for ts in tensors), *map_tables(group), group.num_full, *tables,
        *(float(x) for x in scalars), group.theta0, group.g0, partial,
        float(beta1), float(beta2), float(eps), *kernel_scalars(ex["K"], ex["alpha"], ex["delta"], grad_scale),
        PER_TENSOR=not shared, SNAPSHOT=snapshot, EXTRAPOLATE=extrapolate is not None, K=ex["K"],
        **launch_args(group, all_aligned))
    return combine_stats(partial.double()) if extrapolate else None
