"""Flat-buffer ops of the update rules: one Triton launch per (device, dtype) group.

Every kernel walks the group's block map (block -> tensor index, start) and its int64 pointer
tables, reads the flat theta0 / g0 state at the tensor's offset, and writes per-block partial sums
that torch reduces (deterministic, no atomics). A gradient pointer of 0 means "no grad": g = 0.
On CUDA, csrc/flat_ops_cuda.cu has the same kernels with the same launch layout (GXPO_FLAT_CUDA=csrc).
On CPU without the interpreter the C++ extension (csrc/flat_ops.cpp) runs the same math; the
torch path (the per-tensor reference) is the fallback when neither is there.
"""

import torch
import triton
import triton.language as tl

from .. import backend
from ..flat import FlatGroup
from ..optim.reference import EXTRAP_STATS, extrapolate_reference

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _block(block_tensor, block_start, numels, offsets, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    elems = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    in_bounds = elems < tl.load(numels + t)
    return pid, t, elems, in_bounds, tl.load(offsets + t)


@triton.jit
def _load_grad(grad_ptrs, t, elems, in_bounds, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.zeros([BLOCK], dtype=tl.float32)
    g_addr = tl.load(grad_ptrs + t)
    if g_addr != 0:
        g = tl.load(g_addr.to(tl.pointer_type(DTYPE)) + elems, mask=in_bounds, other=0.0).to(tl.float32)
    return g


@triton.jit
def _snapshot_kernel(param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, g0_ptr,
                     partial_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, elems, in_bounds, off = _block(block_tensor, block_start, numels, offsets, BLOCK)
    p = tl.load(param_ptrs + t).to(tl.pointer_type(DTYPE))
    tl.store(theta0_ptr + off + elems, tl.load(p + elems, mask=in_bounds), mask=in_bounds)
    g = _load_grad(grad_ptrs, t, elems, in_bounds, DTYPE, BLOCK)
    tl.store(g0_ptr + off + elems, g.to(DTYPE), mask=in_bounds)
    tl.store(partial_ptr + pid, tl.sum(g * g, 0))


@triton.jit
def _restore_kernel(param_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, elems, in_bounds, off = _block(block_tensor, block_start, numels, offsets, BLOCK)
    p = tl.load(param_ptrs + t).to(tl.pointer_type(DTYPE))
    tl.store(p + elems, tl.load(theta0_ptr + off + elems, mask=in_bounds), mask=in_bounds)


@triton.jit
def _grad_dots_kernel(grad_ptrs, numels, offsets, block_tensor, block_start, g0_ptr, partial_ptr,
                      WITH_G0: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, elems, in_bounds, off = _block(block_tensor, block_start, numels, offsets, BLOCK)
    g = _load_grad(grad_ptrs, t, elems, in_bounds, DTYPE, BLOCK)
    tl.store(partial_ptr + 2 * pid, tl.sum(g * g, 0))
    if WITH_G0:
        g0 = tl.load(g0_ptr + off + elems, mask=in_bounds, other=0.0).to(tl.float32)
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(g0 * g, 0))
    else:
        tl.store(partial_ptr + 2 * pid + 1, 0.0)


@triton.jit
def _extrapolate_block(theta2, theta0, g0, g1, in_bounds, partial_ptr, pid, alpha, delta, scale_max,
                       K: tl.constexpr, BLOCK: tl.constexpr):
    """theta0 + alpha * scale * (theta2 - theta0) for one block (fp32), its 11 EXTRAP_STATS partials
    stored at partial_ptr + 11 * pid. Shared by the flat op and the fused pass-2 AdamW kernel."""
    abs_g0 = tl.abs(g0)
    active = (abs_g0 > delta) & in_bounds
    r = g1 / (tl.where(g0 >= 0, 1.0, -1.0) * tl.maximum(abs_g0, delta))
    r_finite = (r == r) & (tl.abs(r) < float("inf"))
    clipped = active & ((~r_finite) | (r < -2.0) | (r > 3.0))
    r = tl.where(r != r, 1.0, r)
    r = tl.minimum(tl.maximum(r, -2.0), 3.0)
    r = tl.where(active, r, 1.0)
    s_k = tl.full([BLOCK], 1.0, tl.float32)
    for _ in tl.static_range(K - 1):
        s_k = s_k * r + 1.0
    s_2 = 1.0 + r
    scale = tl.where(tl.abs(s_2) > delta, s_k / s_2, 1.0)
    scale = tl.where((scale == scale) & (tl.abs(scale) < float("inf")), scale, 1.0)
    scale = tl.minimum(tl.maximum(scale, 1.0), scale_max)
    scale = tl.where(active, scale, 1.0)
    d = theta2 - theta0

    out = partial_ptr + 11 * pid
    tl.store(out + 0, tl.sum(g0 * g0, 0))
    tl.store(out + 1, tl.sum(g1 * g1, 0))
    tl.store(out + 2, tl.sum(g0 * g1, 0))
    tl.store(out + 3, tl.sum(active.to(tl.float32), 0))
    tl.store(out + 4, tl.sum(tl.where(active, r, 0.0), 0))
    tl.store(out + 5, tl.sum(tl.where(active, r * r, 0.0), 0))
    tl.store(out + 6, tl.sum(clipped.to(tl.float32), 0))
    tl.store(out + 7, tl.sum(tl.where(active, scale, 0.0), 0))
    tl.store(out + 8, tl.max(scale, 0))
    tl.store(out + 9, tl.sum(d * d, 0))
    tl.store(out + 10, tl.sum(scale * scale * d * d, 0))
    return theta0 + alpha * scale * d


@triton.jit
def _extrapolate_kernel(param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, g0_ptr,
                        partial_ptr, g1_scale, alpha, delta, scale_max,
                        K: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, elems, in_bounds, off = _block(block_tensor, block_start, numels, offsets, BLOCK)
    p = tl.load(param_ptrs + t).to(tl.pointer_type(DTYPE))
    theta2 = tl.load(p + elems, mask=in_bounds, other=0.0).to(tl.float32)
    theta0 = tl.load(theta0_ptr + off + elems, mask=in_bounds, other=0.0).to(tl.float32)
    g0 = tl.load(g0_ptr + off + elems, mask=in_bounds, other=0.0).to(tl.float32)
    g1 = _load_grad(grad_ptrs, t, elems, in_bounds, DTYPE, BLOCK) * g1_scale
    theta_tilde = _extrapolate_block(theta2, theta0, g0, g1, in_bounds, partial_ptr, pid, alpha, delta, scale_max,
                                     K, BLOCK)
    tl.store(p + elems, theta_tilde.to(DTYPE), mask=in_bounds)


def _tables(group: FlatGroup):
    tb = group.tables
    return tb["numels"], tb["offsets"], tb["block_tensor"], tb["block_start"]


def _launch_args(group):
    return {"DTYPE": TL_DTYPES[group.dtype], "BLOCK": group.block}


def _launch(path, group, kernel, csrc_name, args, **constexprs):
    """kernel over the group's blocks, or on path "cuda_csrc" its twin backend._C.<csrc_name>, which
    takes the constexprs' values positionally after args, then the block size."""
    if path == "cuda_csrc":
        getattr(backend._C, csrc_name)(*args, *constexprs.values(), group.block)
    else:
        kernel[(group.num_blocks,)](*args, **constexprs, **_launch_args(group))


def snapshot(group: FlatGroup, grads) -> torch.Tensor:
    """theta0 <- params, g0 <- grads (0 where None); returns sum(g0^2) (0-d, float64)."""
    if group.total == 0:
        return torch.zeros((), dtype=torch.float64, device=group.device)
    path = backend.flat_path(group.theta0)
    if path == "cpp":
        total = backend._C.snapshot(group.local_params(), grads, group.theta0, group.g0, group.offsets)
        return torch.tensor(total, dtype=torch.float64)
    if path == "torch":
        total = torch.zeros((), dtype=torch.float64, device=group.device)
        for i, (p, g) in enumerate(zip(group.local_params(), grads, strict=True)):
            group.view(group.theta0, i).copy_(p)
            if g is None:
                group.view(group.g0, i).zero_()
            else:
                group.view(group.g0, i).copy_(g)
                total += g.double().square().sum()
        return total
    partial = backend.empty(group.num_blocks, dtype=torch.float32, device=group.device)
    args = (group.pointer_table(group.local_params()), group.pointer_table(grads), *_tables(group), group.theta0,
            group.g0, partial)
    _launch(path, group, _snapshot_kernel, "snapshot_cuda", args)
    return partial.double().sum()


def restore(group: FlatGroup) -> None:
    """params <- theta0."""
    if group.total == 0:
        return
    path = backend.flat_path(group.theta0)
    if path == "cpp":
        backend._C.restore(group.local_params(), group.theta0, group.offsets)
        return
    if path == "torch":
        for i, p in enumerate(group.local_params()):
            p.copy_(group.view(group.theta0, i))
        return
    args = (group.pointer_table(group.local_params()), *_tables(group), group.theta0)
    _launch(path, group, _restore_kernel, "restore_cuda", args)


def grad_dots(group: FlatGroup, grads, with_g0: bool) -> torch.Tensor:
    """[sum(g^2), sum(g0 * g)] (float64; the second is 0 unless with_g0)."""
    if group.total == 0:
        return torch.zeros(2, dtype=torch.float64, device=group.device)
    path = backend.flat_path(group.theta0)
    if path == "cpp":
        dots = backend._C.grad_dots(group.local_params(), grads, group.g0, group.offsets, with_g0)
        return torch.tensor(dots, dtype=torch.float64)
    if path == "torch":
        out = torch.zeros(2, dtype=torch.float64, device=group.device)
        for i, g in enumerate(grads):
            if g is not None:
                out[0] += g.double().square().sum()
                if with_g0:
                    out[1] += (group.view(group.g0, i).double() * g.double()).sum()
        return out
    partial = backend.empty(group.num_blocks, 2, dtype=torch.float32, device=group.device)
    args = (group.pointer_table(grads), *_tables(group), group.g0, partial)
    _launch(path, group, _grad_dots_kernel, "grad_dots_cuda", args, WITH_G0=with_g0)
    return partial.double().sum(0)


def extrapolate(group: FlatGroup, grads, *, K: int, alpha: float, delta: float, g1_scale: float = 1.0):
    """params (theta2) <- theta0 + alpha * scale * (theta2 - theta0), with g1 = g1_scale * grads.

    Returns the float64 vector of EXTRAP_STATS (sums over the group; scale_max is a max)."""
    n_stats = len(EXTRAP_STATS)
    if group.total == 0:
        out = torch.zeros(n_stats, dtype=torch.float64, device=group.device)
        out[EXTRAP_STATS.index("scale_max")] = 1.0
        return out
    path = backend.flat_path(group.theta0)
    if path == "cpp":
        sums = backend._C.extrapolate(group.local_params(), grads, group.theta0, group.g0, group.offsets, K,
                                      float(alpha), float(delta), float(g1_scale))
        return torch.tensor(sums, dtype=torch.float64)
    if path == "torch":
        rows = []
        for i, (p, g) in enumerate(zip(group.local_params(), grads, strict=True)):
            g1 = torch.zeros_like(p) if g is None else g * g1_scale
            theta_tilde, stats = extrapolate_reference(group.view(group.theta0, i), p, group.view(group.g0, i), g1,
                                                       K=K, alpha=alpha, delta=delta)
            p.copy_(theta_tilde)
            rows.append(stats.double())
        return combine_stats(torch.stack(rows))
    partial = backend.empty(group.num_blocks, n_stats, dtype=torch.float32, device=group.device)
    args = (group.pointer_table(group.local_params()), group.pointer_table(grads), *_tables(group), group.theta0,
            group.g0, partial, float(g1_scale), float(alpha), float(delta), K / 2 + 1)
    _launch(path, group, _extrapolate_kernel, "extrapolate_cuda", args, K=K)
    return combine_stats(partial.double())


def interpolate(group: FlatGroup, *, alpha: float) -> torch.Tensor:
    """params <- theta0 + alpha * (params - theta0) (SFPO's partial move); returns sum((params - theta0)^2)
    before the move (float64). It is the extrapolation with g1 = 0: r = 0 and S_K(0) / S_2(0) = 1 for
    every coordinate, so every scale is exactly 1 and no gradient is read."""
    stats = extrapolate(group, [None] * len(group.params), K=2, alpha=alpha, delta=1e-8)
    return stats[EXTRAP_STATS.index("d_sq")]


def combine_stats(rows: torch.Tensor) -> torch.Tensor:
    """Reduce [n, len(EXTRAP_STATS)] partial rows: sums, and max for scale_max."""
    out = rows.sum(0)
    i = EXTRAP_STATS.index("scale_max")
    out[i] = rows[:, i].max()
    return out
