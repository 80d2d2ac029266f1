"""CAPO's scores as the authors compute them (github luckeciano/stable-pg-llm, GRPOEntropyTrainer with
`capo_only`): the preconditioned step of each token's LM-head gradient is a prospective Adam step from
per-vocabulary-row moments CAPO keeps itself (SparseAdamModel.batch_compute_effective_token_gradients),
an SGD step while those moments are empty, and the moments are then fed the batch-mean gradient of each
row over the tokens the mask keeps (update_effective_gradient_moments).

For token n with hidden state h (H), sampled token a and advantage A, S = the top-K rows of the
untempered logits (a is not forced in: when it is outside, its one-hot is 0 and v = -pi),
pi = softmax over S, v = e_a - pi, g_k = A v_k h. With moments m, s (rows S_k) at Adam step t:
    m' = b1 m + (1 - b1) g_k,  s' = b2 s + (1 - b2) g_k^2,
    Delta_k = (m' / (1 - b1^(t+1))) / (sqrt(s' / (1 - b2^(t+1))) + eps),
and the kernel reduces each (n, k) to <g_k, Delta_k> and u_k = Delta_k . h; m_H and m_F follow from them
as in capo.scores_from_terms. Delta is not linear in g, so there is no gathered-quadratic shortcut: the
kernel reads two [K, H] moment rows per token (the variant in kernels.py reads one)."""

import torch
import triton
import triton.language as tl

from gxpo_kernels import backend

from .kernels import MAX_BLOCK_H, scores_from_terms, top_rows

GATHER_BYTES = 1 << 26  # the torch paths materialize [tokens, K, H] float32 up to this size at a time


@triton.jit
def _capo_adam_kernel(h_ptr, coef_ptr, rows_ptr, m_ptr, s_ptr, gd_ptr, u_ptr, H, K, stride_h, stride_m, beta1,
                      beta2, bias1, bias2, eps, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    k = tl.program_id(1)
    row = tl.load(rows_ptr + n * K + k).to(tl.int64)
    coef = tl.load(coef_ptr + n * K + k)
    gd = tl.zeros((BLOCK_H,), dtype=tl.float32)
    u = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        inside = cols < H
        h = tl.load(h_ptr + n.to(tl.int64) * stride_h + cols, mask=inside, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + row * stride_m + cols, mask=inside, other=0.0)
        s = tl.load(s_ptr + row * stride_m + cols, mask=inside, other=0.0)
        g = coef * h
        m_hat = (beta1 * m + (1.0 - beta1) * g) / bias1
        s_hat = (beta2 * s + (1.0 - beta2) * g * g) / bias2
        delta = m_hat / (tl.sqrt(s_hat) + eps)
        gd += g * delta
        u += delta * h
    tl.store(gd_ptr + n * K + k, tl.sum(gd, axis=0))
    tl.store(u_ptr + n * K + k, tl.sum(u, axis=0))


def _chunk(K: int, H: int) -> int:
    return max(1, GATHER_BYTES // (4 * K * H))


def prospective_adam_terms(hidden_NH, coef_NK, rows_NK, moments) -> tuple:
    """(<g_k, Delta_k> [N, K], u_k = Delta_k . h [N, K]) for g_k = coef[n, k] h[n]; moments = None (empty:
    Delta = g, an SGD step) or (exp_avg [V, H], exp_avg_sq [V, H], beta1, beta2, eps, t)."""
    N, H = hidden_NH.shape
    K = rows_NK.shape[1]
    dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    if moments is None:
        h_sq = hidden_NH.to(dtype).square().sum(1, keepdim=True)
        coef = coef_NK.to(dtype)
        return coef.square() * h_sq, coef * h_sq
    m_VH, s_VH, beta1, beta2, eps, t = moments
    bias1, bias2 = 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)
    if N and backend.use_triton(hidden_NH) and dtype == torch.float32:
        gd_NK = backend.empty(N, K, dtype=torch.float32, device=hidden_NH.device)
        u_NK = backend.empty(N, K, dtype=torch.float32, device=hidden_NH.device)
        hidden_NH = hidden_NH.contiguous()
        m_VH, s_VH = m_VH.float().contiguous(), s_VH.float().contiguous()
        _capo_adam_kernel[(N, K)](hidden_NH, coef_NK.float().contiguous(), rows_NK.contiguous(), m_VH, s_VH, gd_NK,
                                  u_NK, H, K, hidden_NH.stride(0), m_VH.stride(0), beta1, beta2, bias1, bias2, eps,
                                  BLOCK_H=min(MAX_BLOCK_H, triton.next_power_of_2(H)))
        return gd_NK, u_NK
    gd_NK = torch.empty(N, K, dtype=dtype, device=hidden_NH.device)
    u_NK = torch.empty(N, K, dtype=dtype, device=hidden_NH.device)
    step = _chunk(K, H)
    for start in range(0, N, step):
        end = min(start + step, N)
        h = hidden_NH[start:end].to(dtype)
        g = coef_NK[start:end].to(dtype)[:, :, None] * h[:, None, :]
        rows = rows_NK[start:end]
        m_hat = (beta1 * m_VH[rows].to(dtype) + (1 - beta1) * g) / bias1
        s_hat = (beta2 * s_VH[rows].to(dtype) + (1 - beta2) * g.square()) / bias2
        delta = m_hat / (s_hat.sqrt() + eps)
        gd_NK[start:end] = (g * delta).sum(2)
        u_NK[start:end] = torch.einsum("ckh,ch->ck", delta, h)
    return gd_NK, u_NK


class CAPOMoments:
    """The per-vocabulary-row Adam moments CAPO keeps for its model of the LM head's step (dense [V, H]
    float32, zeros for rows never fed; the authors keep a dict of the rows seen), the Adam step t, and
    whether any row has been fed (until then the modelled step is SGD)."""

    def __init__(self, V: int, H: int, betas=(0.9, 0.999), eps: float = 1e-8, device=None):
        self.exp_avg = torch.zeros(V, H, device=device)
        self.exp_avg_sq = torch.zeros(V, H, device=device)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.t = 0
        self.fed = False

    def as_args(self):
        """prospective_adam_terms' moments argument (None while empty)."""
        if not self.fed:
            return None
        return self.exp_avg, self.exp_avg_sq, self.beta1, self.beta2, self.eps, self.t

    @torch.no_grad()
    def update(self, hidden_NH, coef_NK, rows_NK):
        """One Adam step of the moments: each row touched by some (n, k) gets the mean of those g_k =
        coef[n, k] h[n]; rows not touched keep their moments; t advances either way."""
        N, K = rows_NK.shape
        H = self.exp_avg.shape[1]
        touched, slot_NK = torch.unique(rows_NK, return_inverse=True)  # sums over the touched rows only
        sums_UH = torch.zeros(touched.numel(), H, dtype=torch.float32, device=self.exp_avg.device)
        step = _chunk(K, H)
        for start in range(0, N, step):
            end = min(start + step, N)
            g = coef_NK[start:end].float()[:, :, None] * hidden_NH[start:end].float()[:, None, :]
            sums_UH.index_add_(0, slot_NK[start:end].reshape(-1), g.reshape(-1, H))
        mean = sums_UH / torch.bincount(slot_NK.reshape(-1), minlength=touched.numel())[:, None]
        self.exp_avg[touched] = self.beta1 * self.exp_avg[touched] + (1 - self.beta1) * mean
        self.exp_avg_sq[touched] = self.beta2 * self.exp_avg_sq[touched] + (1 - self.beta2) * mean.square()
        self.t += 1
        self.fed = self.fed or touched.numel() > 0

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "t": self.t, "fed": int(self.fed)}

    def load_state_dict(self, state: dict):
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.t, self.fed = int(state["t"]), bool(state["fed"])


def capo_official_scores(hidden_NH, weight_VH, actions_N, adv_N, moments: CAPOMoments, lr: float, top_k: int = 50,
                         chunk_tokens: int = 1024) -> tuple:
    """(m_H [N], m_F [N], coef [N, K], rows [N, K]): the scores, and what moments.update needs for the
    tokens that are kept. Logits exist a chunk of tokens at a time."""
    N = hidden_NH.shape[0]
    dtype = torch.float64 if hidden_NH.dtype == torch.float64 else torch.float32
    K = min(top_k, weight_VH.shape[0])
    m_H = torch.empty(N, dtype=dtype, device=hidden_NH.device)
    m_F = torch.empty(N, dtype=dtype, device=hidden_NH.device)
    coef_NK = torch.empty(N, K, dtype=dtype, device=hidden_NH.device)
    rows_NK = torch.empty(N, K, dtype=torch.long, device=hidden_NH.device)
    for start in range(0, N, chunk_tokens):
        end = min(start + chunk_tokens, N)
        h = hidden_NH[start:end]
        rows, pi, onehot = top_rows(h @ weight_VH.t(), actions_N[start:end], K, 1.0, force_action=False)
        v = onehot - pi
        A = adv_N[start:end].to(dtype)
        coef = A[:, None] * v
        gd, u = prospective_adam_terms(h, coef, rows, moments.as_args())
        m_H[start:end], m_F[start:end] = scores_from_terms(gd.to(dtype).sum(1), u.to(dtype), pi, v, A, lr)
        coef_NK[start:end], rows_NK[start:end] = coef, rows
    return m_H, m_F, coef_NK, rows_NK


def capo_official_reference(hidden_NH, weight_VH, actions_N, adv_N, moments, lr: float, top_k: int = 50):
    """The same scores the obvious way in float64: g, the prospective moments and Delta as [N, K, H], and
    the curvature with the K x K matrix diag(pi) - pi pi^T written out."""
    h = hidden_NH.double()
    rows, pi, onehot = top_rows(h @ weight_VH.double().t(), actions_N, top_k, 1.0, force_action=False)
    A = adv_N.double()
    v = onehot - pi
    g = A[:, None, None] * v[:, :, None] * h[:, None, :]
    if moments is None:
        delta = g
    else:
        m_VH, s_VH, beta1, beta2, eps, t = moments
        m_hat = (beta1 * m_VH.double()[rows] + (1 - beta1) * g) / (1 - beta1 ** (t + 1))
        s_hat = (beta2 * s_VH.double()[rows] + (1 - beta2) * g.square()) / (1 - beta2 ** (t + 1))
        delta = m_hat / (s_hat.sqrt() + eps)
    u = torch.einsum("nkh,nh->nk", delta, h)
    fisher = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    vu = (v * u).sum(1)
    m_H = lr * (g * delta).sum((1, 2)) + 0.5 * lr**2 * A * (vu.square() - torch.einsum("nk,nkj,nj->n", u, fisher, u))
    return m_H, 0.5 * lr**2 * vu.square()
