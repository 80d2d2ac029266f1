"""Flat-buffer ops of the update rules: one Triton launch per (device, dtype) group.

Every kernel walks the group's block map (block -> tensor index, start) and its int64 pointer
tables, reads the flat theta0 / g0 state at the tensor's offset, and writes per-program partial sums
that torch reduces (deterministic, no atomics). A gradient pointer of 0 means "no grad": g = 0.
On CUDA, csrc/flat_ops_cuda.cu has the same kernels with the same programs (GXPO_FLAT_CUDA=csrc).
On CPU without the interpreter the C++ extension (csrc/flat_ops.cpp here) runs the same math; the
torch path (the per-tensor reference) is the fallback when neither is there.
"""

import torch
import triton
import triton.language as tl

from ... import backend
from . import native
from .buffers import FlatGroup, aligned
from .extrapolation import DELTA, EXTRAP_STATS, MAX_STAT, kernel_scalars
from .reference import extrapolate_reference
from .tiles import (
    BLOCKS_PER_PROGRAM,
    add_stats,
    address,
    block_at,
    extrapolate_tile,
    launch_args,
    load,
    load_if,
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
def _snapshot_block(blk, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, g0_ptr,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    p = address(param_ptrs, t, DTYPE, ALIGNED)
    g_addr = tl.load(grad_ptrs + t)
    acc = tl.zeros([ROWS], tl.float32)
    for k in tl.static_range(BLOCK // (ROWS * G)):
        idx = tile_index(start, k, ROWS, G)
        store(theta0_ptr + off, idx, load(p, idx, numel, MASKED), numel, MASKED)
        g = tl.zeros([ROWS, G], tl.float32)
        if g_addr != 0:
            g = load(address(grad_ptrs, t, DTYPE, ALIGNED), idx, numel, MASKED).to(tl.float32)
        store(g0_ptr + off, idx, g.to(DTYPE), numel, MASKED)
        acc += tl.sum(g * g, 1)
    return acc


@triton.jit
def _snapshot_kernel(param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, num_full, theta0_ptr, g0_ptr,
                     partial_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                     BPP: tl.constexpr, ALIGNED: tl.constexpr):
    pid, n_full_programs, first, end = program_span(num_full, BPP)
    acc = tl.zeros([ROWS], tl.float32)
    if pid < n_full_programs:
        vector_end = end  # blocks [first, vector_end) take 128-bit accesses, the rest 32-bit ones
        if not ALIGNED:
            bits = span_address_bits(param_ptrs, block_tensor, first, end) | span_address_bits(grad_ptrs, block_tensor,
                                                                                              first, end)
            vector_end = tl.where(bits % 16 == 0, end, first)
        for blk in range(first, vector_end):
            acc += _snapshot_block(blk, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr,
                                   g0_ptr, DTYPE, BLOCK, ROWS, G, True, False)
        if not ALIGNED:
            for blk in range(vector_end, end):
                acc += _snapshot_block(blk, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start,
                                       theta0_ptr, g0_ptr, DTYPE, BLOCK, ROWS, G, False, False)
    else:
        acc += _snapshot_block(num_full + pid - n_full_programs, param_ptrs, grad_ptrs, numels, offsets, block_tensor,
                               block_start, theta0_ptr, g0_ptr, DTYPE, BLOCK, ROWS, G, False, True)
    tl.store(partial_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _restore_block(blk, param_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, DTYPE: tl.constexpr,
                   BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr,
                   MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    p = address(param_ptrs, t, DTYPE, ALIGNED)
    for k in tl.static_range(BLOCK // (ROWS * G)):
        idx = tile_index(start, k, ROWS, G)
        store(p, idx, load(theta0_ptr + off, idx, numel, MASKED), numel, MASKED)


@triton.jit
def _restore_kernel(param_ptrs, numels, offsets, block_tensor, block_start, num_full, theta0_ptr,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                    BPP: tl.constexpr, ALIGNED: tl.constexpr):
    pid, n_full_programs, first, end = program_span(num_full, BPP)
    if pid < n_full_programs:
        vector_end = end
        if not ALIGNED:
            vector_end = tl.where(span_address_bits(param_ptrs, block_tensor, first, end) % 16 == 0, end, first)
        for blk in range(first, vector_end):
            _restore_block(blk, param_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, DTYPE, BLOCK,
                           ROWS, G, True, False)
        if not ALIGNED:
            for blk in range(vector_end, end):
                _restore_block(blk, param_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr, DTYPE, BLOCK,
                               ROWS, G, False, False)
    else:
        _restore_block(num_full + pid - n_full_programs, param_ptrs, numels, offsets, block_tensor, block_start,
                       theta0_ptr, DTYPE, BLOCK, ROWS, G, False, True)


@triton.jit
def _grad_dots_block(blk, grad_ptrs, numels, offsets, block_tensor, block_start, g0_ptr, WITH_G0: tl.constexpr,
                     DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
                     ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    g_addr = tl.load(grad_ptrs + t)
    gg = tl.zeros([ROWS], tl.float32)
    g0g = tl.zeros([ROWS], tl.float32)
    if g_addr != 0:
        g_ptr = address(grad_ptrs, t, DTYPE, ALIGNED)
        for k in tl.static_range(BLOCK // (ROWS * G)):
            idx = tile_index(start, k, ROWS, G)
            g = load(g_ptr, idx, numel, MASKED).to(tl.float32)
            gg += tl.sum(g * g, 1)
            if WITH_G0:
                g0g += tl.sum(load(g0_ptr + off, idx, numel, MASKED).to(tl.float32) * g, 1)
    return gg, g0g


@triton.jit
def _grad_dots_kernel(grad_ptrs, numels, offsets, block_tensor, block_start, num_full, g0_ptr, partial_ptr,
                      WITH_G0: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      G: tl.constexpr, BPP: tl.constexpr, ALIGNED: tl.constexpr):
    pid, n_full_programs, first, end = program_span(num_full, BPP)
    gg = tl.zeros([ROWS], tl.float32)
    g0g = tl.zeros([ROWS], tl.float32)
    if pid < n_full_programs:
        vector_end = end
        if not ALIGNED:
            vector_end = tl.where(span_address_bits(grad_ptrs, block_tensor, first, end) % 16 == 0, end, first)
        for blk in range(first, vector_end):
            a, b = _grad_dots_block(blk, grad_ptrs, numels, offsets, block_tensor, block_start, g0_ptr, WITH_G0, DTYPE,
                                    BLOCK, ROWS, G, True, False)
            gg += a
            g0g += b
        if not ALIGNED:
            for blk in range(vector_end, end):
                a, b = _grad_dots_block(blk, grad_ptrs, numels, offsets, block_tensor, block_start, g0_ptr, WITH_G0,
                                        DTYPE, BLOCK, ROWS, G, False, False)
                gg += a
                g0g += b
    else:
        a, b = _grad_dots_block(num_full + pid - n_full_programs, grad_ptrs, numels, offsets, block_tensor,
                                block_start, g0_ptr, WITH_G0, DTYPE, BLOCK, ROWS, G, False, True)
        gg += a
        g0g += b
    tl.store(partial_ptr + 2 * pid, tl.sum(gg, 0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(g0g, 0))


@triton.jit
def _extrapolate_block(blk, acc, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, theta0_ptr,
                       g0_ptr, g1_scale, alpha, delta, scale_max, K: tl.constexpr, DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr,
                       MASKED: tl.constexpr):
    t, start, off, numel = block_at(blk, block_tensor, block_start, offsets, numels, BLOCK, G)
    p = address(param_ptrs, t, DTYPE, ALIGNED)
    g_addr = tl.load(grad_ptrs + t)
    g_ptr = address(grad_ptrs, t, DTYPE, ALIGNED)
    for k in range(BLOCK // (ROWS * G)):  # not unrolled: two tiles' live values would take 72 registers
        idx = tile_index(start, k, ROWS, G)
        theta2 = load(p, idx, numel, MASKED).to(tl.float32)
        theta0 = load(theta0_ptr + off, idx, numel, MASKED).to(tl.float32)
        g0 = load(g0_ptr + off, idx, numel, MASKED).to(tl.float32)
        g1 = load_if(g_ptr, idx, numel, g_addr != 0, MASKED).to(tl.float32) * g1_scale
        theta_tilde, stats = extrapolate_tile(theta2, theta0, g0, g1, valid_mask(idx, numel, MASKED), alpha, delta,
                                               scale_max, delta, 1.0, 0.0, K, False)
        store(p, idx, theta_tilde.to(DTYPE), numel, MASKED)
        acc = add_stats(acc, stats)
    return acc


@triton.jit
def _extrapolate_kernel(param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start, num_full, theta0_ptr,
                        g0_ptr, partial_ptr, g1_scale, alpha, delta, scale_max, K: tl.constexpr, DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, BPP: tl.constexpr,
                        ALIGNED: tl.constexpr):
    pid, n_full_programs, first, end = program_span(num_full, BPP)
    acc = zero_stats(ROWS)
    if pid < n_full_programs:
        vector_end = end
        if not ALIGNED:
            bits = span_address_bits(param_ptrs, block_tensor, first, end) | span_address_bits(grad_ptrs, block_tensor,
                                                                                              first, end)
            vector_end = tl.where(bits % 16 == 0, end, first)
        for blk in range(first, vector_end):
            acc = _extrapolate_block(blk, acc, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start,
                                     theta0_ptr, g0_ptr, g1_scale, alpha, delta, scale_max, K, DTYPE, BLOCK, ROWS, G,
                                     True, False)
        if not ALIGNED:
            for blk in range(vector_end, end):
                acc = _extrapolate_block(blk, acc, param_ptrs, grad_ptrs, numels, offsets, block_tensor, block_start,
                                         theta0_ptr, g0_ptr, g1_scale, alpha, delta, scale_max, K, DTYPE, BLOCK, ROWS,
                                         G, False, False)
    else:
        acc = _extrapolate_block(num_full + pid - n_full_programs, acc, param_ptrs, grad_ptrs, numels, offsets,
                                 block_tensor, block_start, theta0_ptr, g0_ptr, g1_scale, alpha, delta, scale_max, K,
                                 DTYPE, BLOCK, ROWS, G, False, True)
    store_stats(partial_ptr, pid, acc)


def _launch(path, group, kernel, csrc_name, head, tail, aligned, **constexprs):
    """kernel over the group's programs, or on path "cuda_csrc" its twin native._C.<csrc_name> over the same
    programs, which takes the constexprs' values positionally after its arguments, then the layout."""
    if path == "cuda_csrc":
        getattr(native._C, csrc_name)(*head, *map_tables(group), *tail, *constexprs.values(), group.block,
                                       group.num_full, BLOCKS_PER_PROGRAM, aligned)
    else:
        kernel[(num_programs(group),)](*head, *map_tables(group), group.num_full, *tail, **constexprs,
                                       **launch_args(group, aligned))


def _table(group, tensors):
    """(int64 pointer table, whether every tensor is 16-byte aligned)."""
    return group.pointer_table(tensors), aligned(tensors)


def _on_backend(group, empty, cpp, torch_loop, kernel):
    """The op where the group's state lives (native.flat_path): cpp() on the C++ extension, torch_loop() in
    torch, kernel(path) as the Triton program or its csrc CUDA twin; empty() for a group without parameters."""
    if group.total == 0:
        return empty()
    path = native.flat_path(group.theta0)
    if path == "cpp":
        return cpp()
    if path == "torch":
        return torch_loop()
    return kernel(path)


def snapshot(group: FlatGroup, grads) -> torch.Tensor:
    """theta0 <- params, g0 <- grads (0 where None); returns sum(g0^2) (0-d, float64)."""
    def cpp():
        total = native._C.snapshot(group.local_params(), grads, group.theta0, group.g0, group.offsets)
        return torch.tensor(total, dtype=torch.float64)

    def torch_loop():
        total = torch.zeros((), dtype=torch.float64, device=group.device)
        for i, (p, g) in enumerate(zip(group.local_params(), grads, strict=True)):
            group.view(group.theta0, i).copy_(p)
            if g is None:
                group.view(group.g0, i).zero_()
            else:
                group.view(group.g0, i).copy_(g)
                total += g.double().square().sum()
        return total

    def kernel(path):
        partial = backend.empty(num_programs(group), dtype=torch.float32, device=group.device)
        grad_table, grads_aligned = _table(group, grads)
        _launch(path, group, _snapshot_kernel, "snapshot_cuda",
                (group.pointer_table(group.local_params()), grad_table), (group.theta0, group.g0, partial),
                group.params_aligned and grads_aligned)
        return partial.double().sum()

    return _on_backend(group, lambda: torch.zeros((), dtype=torch.float64, device=group.device), cpp, torch_loop,
                       kernel)


def restore(group: FlatGroup) -> None:
    """params <- theta0."""
    def torch_loop():
        for i, p in enumerate(group.local_params()):
            p.copy_(group.view(group.theta0, i))

    _on_backend(group, lambda: None, lambda: native._C.restore(group.local_params(), group.theta0, group.offsets),
                torch_loop, lambda path: _launch(path, group, _restore_kernel, "restore_cuda",
                                                 (group.pointer_table(group.local_params()),), (group.theta0,),
                                                 group.params_aligned))


def grad_dots(group: FlatGroup, grads, with_g0: bool) -> torch.Tensor:
    """[sum(g^2), sum(g0 * g)] (float64; the second is 0 unless with_g0)."""
    def cpp():
        dots = native._C.grad_dots(group.local_params(), grads, group.g0, group.offsets, with_g0)
        return torch.tensor(dots, dtype=torch.float64)

    def torch_loop():
        out = torch.zeros(2, dtype=torch.float64, device=group.device)
        for i, g in enumerate(grads):
            if g is not None:
                out[0] += g.double().square().sum()
                if with_g0:
                    out[1] += (group.view(group.g0, i).double() * g.double()).sum()
        return out

    def kernel(path):
        partial = backend.empty(num_programs(group), 2, dtype=torch.float32, device=group.device)
        grad_table, grads_aligned = _table(group, grads)
        _launch(path, group, _grad_dots_kernel, "grad_dots_cuda", (grad_table,), (group.g0, partial), grads_aligned,
                WITH_G0=with_g0)
        return partial.double().sum(0)

    return _on_backend(group, lambda: torch.zeros(2, dtype=torch.float64, device=group.device), cpp, torch_loop,
                       kernel)


def extrapolate(group: FlatGroup, grads, *, K: int, alpha: float, delta: float, g1_scale: float = 1.0):
    """params (theta2) <- theta0 + alpha * scale * (theta2 - theta0), with g1 = g1_scale * grads.

    Returns the float64 vector of EXTRAP_STATS (sums over the group; scale_max is a max)."""
    n_stats = len(EXTRAP_STATS)
    scalars = kernel_scalars(K, alpha, delta, g1_scale)

    def empty():
        out = torch.zeros(n_stats, dtype=torch.float64, device=group.device)
        out[EXTRAP_STATS.index(MAX_STAT)] = 1.0
        return out

    def cpp():
        sums = native._C.extrapolate(group.local_params(), grads, group.theta0, group.g0, group.offsets, K,
                                      *scalars)
        return torch.tensor(sums, dtype=torch.float64)

    def torch_loop():
        rows = []
        for i, (p, g) in enumerate(zip(group.local_params(), grads, strict=True)):
            g1 = torch.zeros_like(p) if g is None else g * g1_scale
            theta_tilde, stats = extrapolate_reference(group.view(group.theta0, i), p, group.view(group.g0, i), g1,
                                                       K=K, alpha=alpha, delta=delta)
            p.copy_(theta_tilde)
            rows.append(stats.double())
        return combine_stats(torch.stack(rows))

    def kernel(path):
        partial = backend.empty(num_programs(group), n_stats, dtype=torch.float32, device=group.device)
        grad_table, grads_aligned = _table(group, grads)
        params = group.pointer_table(group.local_params())
        _launch(path, group, _extrapolate_kernel, "extrapolate_cuda", (params, grad_table),
                (group.theta0, group.g0, partial, *scalars), group.params_aligned and grads_aligned, K=K)
        return combine_stats(partial.double())

    return _on_backend(group, empty, cpp, torch_loop, kernel)


def interpolate(group: FlatGroup, *, alpha: float) -> torch.Tensor:
    """params <- theta0 + alpha * (params - theta0) (SFPO's partial move); returns sum((params - theta0)^2)
    before the move (float64). It is the extrapolation with g1 = 0: r = 0 and S_K(0) / S_2(0) = 1 for
    every coordinate, so every scale is exactly 1 and no gradient is read."""
    stats = extrapolate(group, [None] * len(group.params), K=2, alpha=alpha, delta=DELTA)
    return stats[EXTRAP_STATS.index("d_sq")]


def combine_stats(rows: torch.Tensor) -> torch.Tensor:
    """Reduce [n, len(EXTRAP_STATS)] partial rows: sums, and max for MAX_STAT."""
    out = rows.sum(0)
    i = EXTRAP_STATS.index(MAX_STAT)
    out[i] = rows[:, i].max()
    return out
