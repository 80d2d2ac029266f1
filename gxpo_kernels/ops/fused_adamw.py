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

from .. import backend
from ..flat import FlatGroup
from ..optim.reference import EXTRAP_STATS
from .flat_ops import _block, _extrapolate_block, _launch_args, _tables, combine_stats


@triton.jit
def _adamw_kernel(param_ptrs, grad_ptrs, m_ptrs, v_ptrs, numels, offsets, block_tensor, block_start,
                  lr_t, wd_t, bc1_t, bc2_sqrt_t, theta0_ptr, g0_ptr, partial_ptr, beta1, beta2, eps, grad_scale,
                  alpha, delta, scale_max, SNAPSHOT: tl.constexpr, EXTRAPOLATE: tl.constexpr, K: tl.constexpr,
                  DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, elems, in_bounds, off = _block(block_tensor, block_start, numels, offsets, BLOCK)
    p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + elems, mask=in_bounds, other=0.0)
    x = p.to(tl.float32)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    g_addr = tl.load(grad_ptrs + t)
    if g_addr != 0:
        g = tl.load(g_addr.to(tl.pointer_type(DTYPE)) + elems, mask=in_bounds, other=0.0).to(tl.float32)
        gs = g * grad_scale
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(DTYPE))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(DTYPE))
        m = tl.load(m_ptr + elems, mask=in_bounds, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + elems, mask=in_bounds, other=0.0).to(tl.float32)
        lr = tl.load(lr_t + t)
        m = m + (1.0 - beta1) * (gs - m)
        v = beta2 * v + (1.0 - beta2) * gs * gs
        x = x * (1.0 - lr * tl.load(wd_t + t))
        x = x - (lr / tl.load(bc1_t + t)) * m / (tl.sqrt(v) / tl.load(bc2_sqrt_t + t) + eps)
        tl.store(m_ptr + elems, m.to(DTYPE), mask=in_bounds)
        tl.store(v_ptr + elems, v.to(DTYPE), mask=in_bounds)
    if SNAPSHOT:
        tl.store(theta0_ptr + off + elems, p, mask=in_bounds)
        tl.store(g0_ptr + off + elems, g.to(DTYPE), mask=in_bounds)
    if EXTRAPOLATE:  # x is theta2 (kept in registers); g the raw g1, not the clipped one
        theta0 = tl.load(theta0_ptr + off + elems, mask=in_bounds, other=0.0).to(tl.float32)
        g0 = tl.load(g0_ptr + off + elems, mask=in_bounds, other=0.0).to(tl.float32)
        x = _extrapolate_block(x, theta0, g0, g, in_bounds, partial_ptr, pid, alpha, delta, scale_max, K, BLOCK)
    tl.store(p_ptr + elems, x.to(DTYPE), mask=in_bounds)


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
    per_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=group.device)  # noqa: E731
    ex = extrapolate or {"K": 2, "alpha": 1.0, "delta": 1.0}
    partial = backend.empty(group.num_blocks if extrapolate else 1, n_stats, dtype=torch.float32,
                            device=group.device)
    _adamw_kernel[(group.num_blocks,)](
        group.pointer_table(group.local_params()), group.pointer_table(grads), group.pointer_table(exp_avgs),
        group.pointer_table(exp_avg_sqs), *_tables(group), per_tensor(lr), per_tensor(weight_decay),
        per_tensor(bc1), per_tensor(bc2_sqrt), group.theta0, group.g0, partial, float(beta1), float(beta2),
        float(eps), float(grad_scale), float(ex["alpha"]), float(ex["delta"]), ex["K"] / 2 + 1,
        SNAPSHOT=snapshot, EXTRAPOLATE=extrapolate is not None, K=ex["K"], **_launch_args(group))
    return combine_stats(partial.double()) if extrapolate else None
