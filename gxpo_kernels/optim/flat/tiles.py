"""The flat-buffer kernels' shared pieces (ops.py, adamw_kernel.py): launch constants, the block map
(programs [0, cdiv(num_full, BPP)) walk BPP full blocks each with unmasked 128-bit accesses; each later
program takes one partial block, a tensor's tail, with masks), masked and unmasked tile loads and stores,
the extrapolation of one tile with its statistics, and the launch arguments."""

import torch
import triton
import triton.language as tl

from .buffers import ALIGN_BYTES, FlatGroup
from .extrapolation import EXTRAP_STATS, MAX_STAT, R_MAX, R_MIN

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_R_MIN, _R_MAX = tl.constexpr(R_MIN), tl.constexpr(R_MAX)  # Triton reads module constants as constexpr
_N_STATS, _MAX_SLOT = tl.constexpr(len(EXTRAP_STATS)), tl.constexpr(EXTRAP_STATS.index(MAX_STAT))


BLOCKS_PER_PROGRAM = 16  # full blocks one program walks, its statistics kept in registers throughout
ROWS = 128  # rows of a tile: one per thread at NUM_WARPS = 4
NUM_WARPS = 4
MAX_REGISTERS = 64  # 8 resident programs of 128 threads per SM on sm_90
# A launch with an unaligned tensor holds both block loops (128-bit and scalar): at 64, Triton 3.6 spills
# the extrapolating ones (make compat's report); 80 leaves 6 resident programs per SM.
MAX_REGISTERS_UNALIGNED = 80


@triton.jit
def program_span(num_full, BPP: tl.constexpr):
    """(pid, number of full-block programs, this program's first and end block)."""
    pid = tl.program_id(0)
    n_full_programs = tl.cdiv(num_full, BPP)
    first = pid * BPP
    return pid, n_full_programs, first, tl.minimum(first + BPP, num_full)


@triton.jit
def block_at(blk, block_tensor, block_start, offsets, numels, BLOCK: tl.constexpr, G: tl.constexpr):
    """(tensor, first element, segment offset in theta0 / g0, tensor numel) of block blk."""
    t = tl.load(block_tensor + blk)
    start = tl.multiple_of(tl.load(block_start + blk), BLOCK)
    return t, start, tl.multiple_of(tl.load(offsets + t), G), tl.load(numels + t)


@triton.jit
def span_address_bits(table, block_tensor, first, end):
    """The bitwise OR of the addresses in `table` of the tensors of blocks [first, end): a multiple of 16 when
    each starts on a 16-byte boundary (a 0 pointer, no tensor, counts as aligned). A launch whose tensors are
    not all aligned checks each program's span, so one unaligned tensor costs only its own programs the 128-bit
    path."""
    bits = tl.zeros([], tl.int64)
    for blk in range(first, end):
        bits = bits | tl.load(table + tl.load(block_tensor + blk))
    return bits


@triton.jit
def address(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def tile_index(start, k, ROWS: tl.constexpr, G: tl.constexpr):
    """Element indices of tile k of a block: [ROWS, G], G contiguous elements (16 bytes) per thread."""
    return start + k * ROWS * G + tl.arange(0, ROWS)[:, None] * G + tl.arange(0, G)[None, :]


@triton.jit
def load(ptr, idx, numel, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=idx < numel, other=0.0)
    else:
        return tl.load(ptr + idx)


@triton.jit
def load_if(ptr, idx, numel, present, MASKED: tl.constexpr):
    """A load predicated on `present` (a gradient that exists): 0 where absent, no branch. The predicate is
    a splat compared, not a broadcast bool, which Triton's interpreter rejects as a mask."""
    mask = (tl.full(idx.shape, 0, tl.int32) + present.to(tl.int32)) != 0
    if MASKED:
        mask = mask & (idx < numel)
    return tl.load(ptr + idx, mask=mask, other=0.0)


@triton.jit
def store(ptr, idx, value, numel, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, value, mask=idx < numel)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def valid_mask(idx, numel, MASKED: tl.constexpr):
    if MASKED:
        return idx < numel
    else:
        return tl.full(idx.shape, 1, tl.int1)


@triton.jit
def extrapolate_tile(theta2, theta0, g0, g1, valid, alpha, delta, scale_max, thr, r_scale, min_eff, K: tl.constexpr,
                     RELATIVE: tl.constexpr):
    """theta0 + alpha * scale * (theta2 - theta0) elementwise (fp32), and the tile's 11 EXTRAP_STATS as
    per-row sums (scale_max a per-row max). Shared by the flat op and the fused pass-2 AdamW kernel.
    g0 / g1 are the retention ratio's denominator and numerator. RELATIVE (the authors' current spaces): active
    where |g0| > thr (their per-tensor 1e-3 RMS(g0)), r = r_scale g1 / g0, the move max(alpha scale, min_eff);
    otherwise active where |g0| > delta, r = g1 / g0."""
    if not RELATIVE:
        thr = delta
    abs_g0 = tl.abs(g0)
    active = (abs_g0 > thr) & valid
    num = g1
    if RELATIVE:
        num = g1 * r_scale
    r = num / (tl.where(g0 >= 0, 1.0, -1.0) * tl.maximum(abs_g0, thr))
    r_finite = (r == r) & (tl.abs(r) < float("inf"))
    clipped = active & ((~r_finite) | (r < _R_MIN) | (r > _R_MAX))
    r = tl.where(r != r, 1.0, r)
    r = tl.minimum(tl.maximum(r, _R_MIN), _R_MAX)
    r = tl.where(active, r, 1.0)
    s_k = tl.full(r.shape, 1.0, tl.float32)
    for _ in tl.static_range(K - 1):
        s_k = s_k * r + 1.0
    s_2 = 1.0 + r
    scale = tl.where(tl.abs(s_2) > delta, s_k / s_2, 1.0)
    scale = tl.where((scale == scale) & (tl.abs(scale) < float("inf")), scale, 1.0)
    scale = tl.minimum(tl.maximum(scale, 1.0), scale_max)
    scale = tl.where(active, scale, 1.0)
    d = theta2 - theta0
    sd = scale * d
    stats = (tl.sum(g0 * g0, 1), tl.sum(g1 * g1, 1), tl.sum(g0 * g1, 1), tl.sum(active.to(tl.float32), 1),
             tl.sum(tl.where(active, r, 0.0), 1), tl.sum(tl.where(active, r * r, 0.0), 1),
             tl.sum(clipped.to(tl.float32), 1), tl.sum(tl.where(active, scale, 0.0), 1),
             tl.max(tl.where(valid, scale, 1.0), 1), tl.sum(d * d, 1), tl.sum(sd * sd, 1))
    if RELATIVE:
        return theta0 + tl.maximum(alpha * scale, min_eff) * d, stats
    return theta0 + alpha * sd, stats


@triton.jit
def add_stats(acc, stats):
    return (acc[0] + stats[0], acc[1] + stats[1], acc[2] + stats[2], acc[3] + stats[3], acc[4] + stats[4],
            acc[5] + stats[5], acc[6] + stats[6], acc[7] + stats[7], tl.maximum(acc[8], stats[8]),
            acc[9] + stats[9], acc[10] + stats[10])


@triton.jit
def zero_stats(ROWS: tl.constexpr):
    z = tl.zeros([ROWS], tl.float32)
    return (z, z, z, z, z, z, z, z, z + 1.0, z, z)


@triton.jit
def store_stats(partial_ptr, pid, acc):
    """The program's 11 statistics, reduced across its rows once."""
    out = partial_ptr + _N_STATS * pid
    for k in tl.static_range(_N_STATS):
        if k == _MAX_SLOT:
            tl.store(out + k, tl.max(acc[k], 0))
        else:
            tl.store(out + k, tl.sum(acc[k], 0))


def map_tables(group: FlatGroup):
    tb = group.tables
    return tb["numels"], tb["offsets"], tb["block_tensor"], tb["block_start"]


def num_programs(group: FlatGroup) -> int:
    return triton.cdiv(group.num_full, BLOCKS_PER_PROGRAM) + group.num_blocks - group.num_full


def launch_args(group, aligned: bool):
    """aligned: every tensor of the launch starts on a 16-byte boundary (checked on the host), so the full blocks
    take one 128-bit code path; otherwise each full-block program checks its own blocks' tensors
    (span_address_bits)."""
    G = ALIGN_BYTES // group.theta0.element_size()
    rows = min(ROWS, group.block // G)
    assert group.block % (rows * G) == 0, f"block {group.block} is not a multiple of {rows * G} elements"
    return {"DTYPE": TL_DTYPES[group.dtype], "BLOCK": group.block, "ROWS": rows, "G": G, "BPP": BLOCKS_PER_PROGRAM,
            "ALIGNED": aligned, "num_warps": NUM_WARPS, "num_stages": 1,
            "maxnreg": MAX_REGISTERS if aligned else MAX_REGISTERS_UNALIGNED}
