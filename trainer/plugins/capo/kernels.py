"""CAPO's per-token curvature scores on the LM head, our variant (`capo.mode = "optimizer_moments"`),
without the [N, K, H] per-token gradients. The authors' computation is in official_kernels.py.

For token n with final hidden state h (H), sampled token a, advantage A and the top-K rows S of its
distribution at temperature T (a forced into S), pi = softmax(z_S / T), v = e_a - pi. The LM-head
gradient of A log pi_a restricted to S is g = (A / T) v (x) h; its AdamW-preconditioned step is
Delta = g * r[S] with r = 1 / (sqrt(v_hat) + eps) the real optimizer's per-element preconditioner;
u = Delta h. The second-order terms carry the same 1 / T (grad log pi = v (x) h / T):
    m_H = lr <g, Delta> + 0.5 lr^2 A [(v . u)^2 - u^T (diag pi - pi pi^T) u] / T^2,
    m_F = 0.5 lr^2 (v . u)^2 / T^2.
Every term is a function of q[n, k] = sum_j h[n, j]^2 r[S[n, k], j]:
    <g, Delta> = (A / T)^2 sum_k v_k^2 q_k,   u_k = (A / T) v_k q_k,
so the kernel computes q (a gathered quadratic form: K rows of r against h^2 per token) and the rest is
O(K) per token. The reference (capo_reference) materializes g and Delta in float64."""

import torch
import triton
import triton.language as tl

from gxpo_kernels import backend

MAX_BLOCK_H = 1024


@triton.jit
def _capo_q_kernel(h_ptr, r_ptr, rows_ptr, q_ptr, H, K, stride_h, stride_r, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    k = tl.program_id(1)
    row = tl.load(rows_ptr + n * K + k).to(tl.int64)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        inside = cols < H
        h = tl.load(h_ptr + n.to(tl.int64) * stride_h + cols, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=inside, other=0.0).to(tl.float32)
        acc += h * h * r
    tl.store(q_ptr + n * K + k, tl.sum(acc, axis=0))


def gathered_quadratic(hidden_NH: torch.Tensor, precond_VH: torch.Tensor, rows_NK: torch.Tensor,
                       chunk_tokens: int = 256) -> torch.Tensor:
    """q[n, k] = sum_j hidden[n, j]^2 * precond[rows[n, k], j], float32 (float64 for float64 inputs)."""
    N, H = hidden_NH.shape
    K = rows_NK.shape[1]
    out_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    if N == 0:
        return torch.zeros(0, K, dtype=out_dtype, device=hidden_NH.device)
    if backend.use_triton(hidden_NH) and out_dtype == torch.float32:
        hidden_NH, precond_VH = hidden_NH.contiguous(), precond_VH.contiguous()
        q_NK = backend.empty(N, K, dtype=torch.float32, device=hidden_NH.device)
        BLOCK_H = min(MAX_BLOCK_H, triton.next_power_of_2(H))
        _capo_q_kernel[(N, K)](hidden_NH, precond_VH, rows_NK.contiguous(), q_NK, H, K, hidden_NH.stride(0),
                               precond_VH.stride(0), BLOCK_H=BLOCK_H)
        return q_NK
    q_NK = torch.empty(N, K, dtype=out_dtype, device=hidden_NH.device)
    for start in range(0, N, chunk_tokens):  # [chunk, K, H] at a time
        end = min(start + chunk_tokens, N)
        h2 = hidden_NH[start:end].to(out_dtype).square()
        q_NK[start:end] = torch.einsum("ckh,ch->ck", precond_VH[rows_NK[start:end]].to(out_dtype), h2)
    return q_NK


def top_rows(logits_NV: torch.Tensor, actions_N: torch.Tensor, K: int, temperature: float, force_action=True):
    """(rows [N, K], pi over them [N, K] (float32+), one-hot of the sampled token [N, K]). force_action:
    the sampled token replaces the last row when outside the top K (otherwise its one-hot is all zero)."""
    K = min(K, logits_NV.shape[1])
    rows = logits_NV.topk(K, dim=1).indices
    if force_action:
        inside = (rows == actions_N[:, None]).any(1)
        rows[:, -1] = torch.where(inside, rows[:, -1], actions_N)
    stats_dtype = torch.float64 if logits_NV.dtype == torch.float64 else torch.float32
    pi = torch.softmax(logits_NV.gather(1, rows).to(stats_dtype) / temperature, dim=1)
    return rows, pi, (rows == actions_N[:, None]).to(stats_dtype)


def scores_from_terms(g_dot_delta_N, u_NK, pi_NK, v_NK, A_N, lr: float, temperature: float = 1.0):
    """(m_H [N], m_F [N]) from <g, Delta>, u = Delta h and the distribution over the rows."""
    vu = (v_NK * u_NK).sum(1) / temperature
    quad = ((pi_NK * u_NK.square()).sum(1) - (pi_NK * u_NK).sum(1).square()) / temperature**2
    m_H = lr * g_dot_delta_N + 0.5 * lr**2 * A_N * (vu.square() - quad)
    return m_H, 0.5 * lr**2 * vu.square()


def scores_from_q(q_NK, pi_NK, onehot_NK, adv_N, lr: float, temperature: float = 1.0):
    """(m_H [N], m_F [N]) from the gathered quadratic form."""
    v = onehot_NK - pi_NK
    A = adv_N.to(q_NK.dtype)
    coef = A[:, None] * v / temperature  # g_k = coef_k h
    return scores_from_terms((coef.square() * q_NK).sum(1), coef * q_NK, pi_NK, v, A, lr, temperature)


def capo_scores(hidden_NH, weight_VH, actions_N, adv_N, precond_VH, lr: float, top_k: int = 50,
                temperature: float = 1.0, chunk_tokens: int = 1024):
    """(m_H [N], m_F [N]) per token; the [N, V] logits exist a chunk of tokens at a time, and the per-token
    gradients never."""
    N = hidden_NH.shape[0]
    stats_dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    m_H = torch.empty(N, dtype=stats_dtype, device=hidden_NH.device)
    m_F = torch.empty(N, dtype=stats_dtype, device=hidden_NH.device)
    for start in range(0, N, chunk_tokens):
        end = min(start + chunk_tokens, N)
        h = hidden_NH[start:end]
        rows, pi, onehot = top_rows(h @ weight_VH.t(), actions_N[start:end], top_k, temperature)
        q = gathered_quadratic(h, precond_VH, rows)
        m_H[start:end], m_F[start:end] = scores_from_q(q.to(stats_dtype), pi, onehot, adv_N[start:end], lr,
                                                       temperature)
    return m_H, m_F


def capo_reference(hidden_NH, weight_VH, actions_N, adv_N, precond_VH, lr: float, top_k: int = 50,
                   temperature: float = 1.0):
    """The same scores the obvious way in float64: per-token gradients [N, K, H] materialized."""
    h = hidden_NH.double()
    rows, pi, onehot = top_rows(h @ weight_VH.double().t(), actions_N, top_k, temperature)
    A = adv_N.double()
    v = onehot - pi
    g = A[:, None, None] * v[:, :, None] * h[:, None, :] / temperature  # [N, K, H]
    delta = g * precond_VH.double()[rows]
    u = torch.einsum("nkh,nh->nk", delta, h) / temperature  # grad log pi . Delta needs the 1/T of its own
    vu = (v * u).sum(1)
    curvature = torch.einsum("nk,nk->n", pi, u.square()) - torch.einsum("nk,nk->n", pi, u).square()
    m_H = lr * (g * delta).sum((1, 2)) + 0.5 * lr**2 * A * (vu.square() - curvature)
    return m_H, 0.5 * lr**2 * vu.square()
