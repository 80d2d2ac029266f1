"""GRPO loss fused with the LM head in tiles: the [N, V] logits never reach memory (the Cut Cross-Entropy
class, Wijmans et al. 2025), with the entropy and a temperature, which the GRPO trainer needs.

Forward: a [BLOCK_N, BLOCK_V] logit tile at a time from tl.dot over H (fp32 accumulation), an online
log-sum-exp, the entropy's sum of p z and the target logit per row; each program covers one of
`splits` slices of the vocabulary and writes [N]-sized partials, combined in torch. The per-token GRPO
math then runs on [N] vectors (grpo_terms.token_terms). Backward: every (token tile, vocabulary tile)
recomputes its logits, forms dlogits = c (onehot - p) in registers (c = w dloss/dlogp / T times
grad_output, read on the device) and accumulates d_hidden = dlogits @ W and d_weight = dlogits^T @ h
with fp32 atomic adds. filter_eps > 0 skips a tile whose every p < filter_eps and which holds no target:
each skipped gradient entry is below |c_n| * filter_eps (docs/algorithm.md gives the resulting bound on
each gradient)."""

import torch
import triton
import triton.language as tl

from .. import backend


@triton.jit
def _row_offsets(index, stride):
    """index * stride in int64: [V, H] and [N, H] may hold more than 2^31 elements."""
    return index.to(tl.int64)[:, None] * stride


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(h[rows] @ W[cols]^T + b[cols]) / T as a [BLOCK_N, BLOCK_V] fp32 tile; -inf at columns >= V."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    h_rows, w_rows = h_ptr + _row_offsets(rows, stride_h), w_ptr + _row_offsets(cols, stride_w)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        h = tl.load(h_rows + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < H), other=0.0)
        w = tl.load(w_rows + k[None, :], mask=(cols[:, None] < V) & (k[None, :] < H), other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < V, acc * inv_temp, -float("inf"))


@triton.jit
def _lm_head_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, part_ptr,
    N, V, H, stride_h, stride_w, inv_temp, tiles_per_split,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (token tile, vocabulary split): the split's running max m, sum of exp(z - m), sum of
    exp(z - m) z and target logit z[id] per row, into part[0..3, split, N]."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + rows, mask=rows < N, other=-1)
    m = tl.full([BLOCK_N], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    ez = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        target += tl.sum(tl.where(cols[None, :] == ids[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(e, 1)
        if WITH_ENTROPY:
            ez = ez * scale + tl.sum(tl.where(e > 0.0, e * z, 0.0), 1)
        m = m_new
    out = part_ptr + split * N + rows
    split_stride = tl.num_programs(1) * N
    tl.store(out, m, mask=rows < N)
    tl.store(out + split_stride, s, mask=rows < N)
    tl.store(out + 2 * split_stride, ez, mask=rows < N)
    tl.store(out + 3 * split_stride, target, mask=rows < N)


@triton.jit
def _lm_head_bwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, coef_ptr, lse_ptr, grad_out_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, H, stride_h, stride_w, inv_temp, filter_eps, group_n,
    HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ent_coef_ptr=None, entropy_ptr=None, HAS_ENT: tl.constexpr = False,
):
    """Program (token tile, vocabulary tile), grouped so that group_n token tiles sweep the vocabulary
    together (their d_hidden rows stay in L2; each d_weight tile takes group_n adds while it is there):
    recompute the logits, dlogits = c (onehot - p) in registers, atomically add its products."""
    pid = tl.program_id(0)
    tiles_n, tiles_v = tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V)
    group = pid // (group_n * tiles_v)
    first_n = group * group_n
    size = tl.minimum(tiles_n - first_n, group_n)
    pid_n = first_n + (pid % (group_n * tiles_v)) % size
    pid_v = (pid % (group_n * tiles_v)) // size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + rows, mask=rows < N, other=0.0) * tl.load(grad_out_ptr).to(tl.float32)
    if HAS_ENT:
        ent_coef = tl.load(ent_coef_ptr + rows, mask=rows < N, other=0.0) * tl.load(grad_out_ptr).to(tl.float32)
        if tl.max(tl.abs(coef), 0) + tl.max(tl.abs(ent_coef), 0) == 0.0:
            return
    else:
        if tl.max(tl.abs(coef), 0) == 0.0:  # no gradient from any row of this tile (zero advantages)
            return
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_temp,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    # rows >= N: lse +inf, so p = 0 whatever their logits (a large bias would overflow exp and 0 x inf is NaN)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=float("inf"))
    p = tl.exp(z - lse[:, None])
    ids = tl.load(ids_ptr + rows, mask=rows < N, other=-1)
    is_target = cols[None, :] == ids[:, None]
    if FILTER:
        if (tl.max(tl.max(p, 1), 0) < filter_eps) & (tl.max(tl.max(is_target.to(tl.int32), 1), 0) == 0):
            return
    d = coef[:, None] * (tl.where(is_target, 1.0, 0.0) - p)  # 0 at columns >= V (p = 0) and rows >= N
    if HAS_ENT:  # the entropy's gradient -p (log p + H); 0 where p = 0 (log p is -inf there)
        ent = tl.load(entropy_ptr + rows, mask=rows < N, other=0.0)
        d -= tl.where(p > 0.0, ent_coef[:, None] * p * (z - lse[:, None] + ent[:, None]), 0.0)
    d_in = d.to(h_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_H)
    h_rows, w_rows = h_ptr + _row_offsets(rows, stride_h), w_ptr + _row_offsets(cols, stride_w)
    dh_rows, dw_rows = dh_ptr + _row_offsets(rows, H), dw_ptr + _row_offsets(cols, H)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        if NEED_DH:
            w = tl.load(w_rows + k[None, :], mask=(cols[:, None] < V) & (k[None, :] < H), other=0.0)
            dh = tl.dot(d_in, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_rows + k[None, :], dh, mask=(rows[:, None] < N) & (k[None, :] < H), sem="relaxed")
        if NEED_DW:
            h = tl.load(h_rows + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < H), other=0.0)
            dw = tl.dot(tl.trans(d_in), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_rows + k[None, :], dw, mask=(cols[:, None] < V) & (k[None, :] < H), sem="relaxed")
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(d, 0), mask=cols < V, sem="relaxed")


L2_BUDGET_BYTES = 24 << 20  # the share of an H100's 50 MB L2 that a group's fp32 d_hidden rows may take


def tile_config(N: int, V: int, H: int, device: torch.device) -> dict:
    """Tiles and vocabulary splits: tensor-core tiles on a GPU; small ones under the interpreter (tests)."""
    if device.type == "cuda":
        cfg = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8}
    else:
        cfg = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "num_warps": 4}
    tiles_n, tiles_v = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    cfg["group_n"] = max(1, min(tiles_n, L2_BUDGET_BYTES // (cfg["BLOCK_N"] * H * 4))) if device.type == "cuda" \
        else 2
    # enough programs for every SM a few times over; each split a run of whole vocabulary tiles
    splits = min(tiles_v, max(1, triton.cdiv(4 * 132, tiles_n))) if device.type == "cuda" else min(tiles_v, 3)
    cfg["tiles_per_split"] = triton.cdiv(tiles_v, splits)
    cfg["splits"] = triton.cdiv(tiles_v, cfg["tiles_per_split"])
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 as torch's matmul runs it (torch.get_float32_matmul_precision(): "highest" exact, else tf32 tensor
    cores); bf16 / fp16 always on the tensor cores (the argument is ignored for them)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def lm_head_lse(hidden_NH, weight_VH, bias_V, ids_N, temperature: float, with_entropy: bool, config=None):
    """(lse, target logit, entropy) of softmax((h W^T + b) / T) per row, [N] fp32 each (entropy None unless
    with_entropy), without the logits in memory."""
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    cfg = config or tile_config(N, V, H, hidden_NH.device)
    part = backend.empty(4, cfg["splits"], N, dtype=torch.float32, device=hidden_NH.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["splits"])
    _lm_head_fwd_kernel[grid](
        hidden_NH, weight_VH, bias_V if bias_V is not None else weight_VH, ids_N, part,
        N, V, H, hidden_NH.stride(0), weight_VH.stride(0), 1.0 / temperature, cfg["tiles_per_split"],
        HAS_BIAS=bias_V is not None, WITH_ENTROPY=with_entropy, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"], DOT_PRECISION=_dot_precision(hidden_NH.dtype), num_warps=cfg["num_warps"],
    )
    m_SN, s_SN, ez_SN, target_SN = part
    m_N = m_SN.max(0).values
    scale_SN = torch.exp(m_SN - m_N)
    s_N = (s_SN * scale_SN).sum(0)
    lse_N = m_N + torch.log(s_N)
    entropy_N = lse_N - (ez_SN * scale_SN).sum(0) / s_N if with_entropy else None
    return lse_N, target_SN.sum(0), entropy_N


def lm_head_grads(hidden_NH, weight_VH, bias_V, ids_N, coef_N, lse_N, grad_out, temperature: float,
                  needs: tuple, filter_eps: float = 0.0, config=None, entropy_coef_N=None, entropy_N=None):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes (None where not needed) of sum_n c_n logp_n, c =
    coef * grad_out (a one-element device tensor), accumulated in fp32 without the logits in memory."""
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    dev = hidden_NH.device
    cfg = config or tile_config(N, V, H, dev)
    need_dh, need_dw, need_db = needs
    # atomically accumulated: start from zero (never poisoned)
    acc = lambda need, *shape: torch.zeros(shape, dtype=torch.float32, device=dev) if need else None  # noqa: E731
    dh, dw, db = acc(need_dh, N, H), acc(need_dw, V, H), acc(need_db, V)
    tiles_n, tiles_v = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
    _lm_head_bwd_kernel[(tiles_n * tiles_v,)](
        hidden_NH, weight_VH, bias_V if bias_V is not None else weight_VH, ids_N, coef_N, lse_N, grad_out,
        dh if dh is not None else coef_N, dw if dw is not None else coef_N, db if db is not None else coef_N,
        N, V, H, hidden_NH.stride(0), weight_VH.stride(0), 1.0 / temperature, float(filter_eps), cfg["group_n"],
        HAS_BIAS=bias_V is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, FILTER=filter_eps > 0,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
        DOT_PRECISION=_dot_precision(hidden_NH.dtype), num_warps=cfg["num_warps"],
        **({} if entropy_coef_N is None else dict(ent_coef_ptr=entropy_coef_N, entropy_ptr=entropy_N, HAS_ENT=True)),
    )
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(dh, hidden_NH), cast(dw, weight_VH), None if db is None else db.to(bias_V.dtype)
