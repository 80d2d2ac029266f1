"""CAPO's two computations against values computed by hand in float64 (plain loops over tokens, rows and
hidden units, the K x K curvature matrix written out): the authors' (own sparse Adam moments, prospective
step, SGD while empty, no forced token, untempered) and our variant (the optimizer's preconditioner,
forced token, a temperature carried through every term); the kernels (interpreter and torch paths) and
the materializing references against them; the moment updates; the mask rules."""

import math

import pytest
import torch
from helpers import rel_err

from trainer.plugins.capo import kernels as capo
from trainer.plugins.capo import official_kernels as capo_adam
from trainer.plugins.capo.kernels import capo_reference, capo_scores
from trainer.plugins.capo.official_kernels import CAPOMoments, capo_official_reference, capo_official_scores
from trainer.plugins.capo.plugin import keep_tokens


def case(N=3, H=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    logits = hidden @ weight.t()
    actions = torch.stack([logits[0].argmax(), logits[1].argmin(), logits[2].argsort()[-2]])[:N]
    moments = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.1,
               torch.rand(V, H, generator=g, dtype=torch.float64) * 0.05, 0.9, 0.99, 1e-8, 4)
    return hidden, weight, actions, adv, moments


def by_hand(hidden, weight, actions, adv, lr, K, temperature=1.0, force=False, moments=None, precond=None):
    """m_H, m_F per token with loops: g_k = (A/T) v_k h, Delta from Adam (moments), SGD (neither) or g * r."""
    out_H, out_F = [], []
    for n in range(hidden.shape[0]):
        h = hidden[n].tolist()
        z = [sum(w * x for w, x in zip(weight[v].tolist(), h, strict=True)) for v in range(weight.shape[0])]
        S = sorted(range(len(z)), key=lambda v: -z[v])[:K]
        if force and int(actions[n]) not in S:
            S[-1] = int(actions[n])
        e = [math.exp(z[v] / temperature) for v in S]
        pi = [x / sum(e) for x in e]
        v = [float(S[k] == int(actions[n])) - pi[k] for k in range(K)]
        A = float(adv[n])
        g = [[A / temperature * v[k] * h[j] for j in range(len(h))] for k in range(K)]
        delta = []
        for k in range(K):
            row = []
            for j in range(len(h)):
                if moments is not None:
                    m, s, b1, b2, eps, t = moments
                    m_new = b1 * float(m[S[k], j]) + (1 - b1) * g[k][j]
                    s_new = b2 * float(s[S[k], j]) + (1 - b2) * g[k][j] ** 2
                    row.append(m_new / (1 - b1 ** (t + 1)) / (math.sqrt(s_new / (1 - b2 ** (t + 1))) + eps))
                elif precond is not None:
                    row.append(g[k][j] * float(precond[S[k], j]))
                else:
                    row.append(g[k][j])
            delta.append(row)
        u = [sum(delta[k][j] * h[j] for j in range(len(h))) / temperature for k in range(K)]
        F = [[(pi[i] if i == k else 0.0) - pi[i] * pi[k] for k in range(K)] for i in range(K)]
        vu = sum(v[k] * u[k] for k in range(K))
        uFu = sum(u[i] * F[i][k] * u[k] for i in range(K) for k in range(K))
        g_dot = sum(g[k][j] * delta[k][j] for k in range(K) for j in range(len(h)))
        out_H.append(lr * g_dot + 0.5 * lr**2 * A * (vu**2 - uFu))
        out_F.append(0.5 * lr**2 * vu**2)
    return torch.tensor(out_H, dtype=torch.float64), torch.tensor(out_F, dtype=torch.float64)


@pytest.mark.parametrize("empty", [False, True])
def test_official_scores_match_the_hand_computation(empty, path, monkeypatch):
    monkeypatch.setattr(capo, "MAX_BLOCK_H", 4)  # two blocks along H = 5, the last one partial
    hidden, weight, actions, adv, args = case()
    expected = by_hand(hidden, weight, actions, adv, lr=0.3, K=4, moments=None if empty else args)
    assert float(expected[1][1]) > 0  # token 1 sampled the least likely token: outside the top 4, v = -pi
    ref = capo_official_reference(hidden, weight, actions, adv, None if empty else args, lr=0.3, top_k=4)
    assert rel_err(ref[0], expected[0]) < 1e-12 and rel_err(ref[1], expected[1]) < 1e-12
    moments = CAPOMoments(*weight.shape, betas=args[2:4], eps=args[4])
    if not empty:
        moments.exp_avg.copy_(args[0]), moments.exp_avg_sq.copy_(args[1])
        moments.t, moments.fed = args[5], True
    m_H, m_F, _, _ = capo_official_scores(hidden.float(), weight.float(), actions, adv.float(), moments, lr=0.3,
                                          top_k=4, chunk_tokens=2)
    assert rel_err(m_H, expected[0]) < 1e-5 and rel_err(m_F, expected[1]) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_variant_scores_match_the_hand_computation(temperature):
    hidden, weight, actions, adv, _ = case(seed=1)
    precond = 1 / (torch.rand(weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1)
    expected = by_hand(hidden, weight, actions, adv, lr=0.3, K=4, temperature=temperature, force=True,
                       precond=precond)
    ref = capo_reference(hidden, weight, actions, adv, precond, lr=0.3, top_k=4, temperature=temperature)
    assert rel_err(ref[0], expected[0]) < 1e-12 and rel_err(ref[1], expected[1]) < 1e-12
    m_H, m_F = capo_scores(hidden.float(), weight.float(), actions, adv.float(), precond.float(), lr=0.3, top_k=4,
                           temperature=temperature)
    assert rel_err(m_H, expected[0]) < 1e-5 and rel_err(m_F, expected[1]) < 1e-5


@pytest.mark.parametrize("N,H,V,K", [(37, 48, 300, 50), (70, 20, 129, 3)])
def test_official_kernel_matches_the_reference_at_larger_shapes(N, H, V, K, path):
    g = torch.Generator().manual_seed(N)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    actions, adv = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)
    moments = CAPOMoments(V, H, betas=(0.9, 0.999))
    moments.exp_avg.normal_(generator=g).mul_(0.1), moments.exp_avg_sq.uniform_(generator=g).mul_(0.01)
    moments.t, moments.fed = 7, True
    m_H, m_F, _, _ = capo_official_scores(hidden, weight, actions, adv, moments, lr=1e-2, top_k=K, chunk_tokens=16)
    ref_H, ref_F = capo_official_reference(hidden, weight, actions, adv, moments.as_args(), lr=1e-2, top_k=K)
    assert rel_err(m_H, ref_H) < 1e-5 and rel_err(m_F, ref_F) < 1e-5


def test_moments_take_each_rows_mean_gradient_and_leave_untouched_rows(monkeypatch):
    monkeypatch.setattr(capo_adam, "GATHER_BYTES", 4 * 2 * 3)  # one token per chunk
    hidden = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    rows = torch.tensor([[4, 1], [1, 0], [2, 4]])
    coef = torch.tensor([[0.5, -1.0], [2.0, 1.0], [-0.2, 0.4]])
    moments = CAPOMoments(6, 2, betas=(0.9, 0.99))
    moments.exp_avg[5] = 7.0
    moments.update(hidden, coef, rows)
    expected_mean = {0: [3.0, -1.0], 1: [(-1.0 * 1 + 2.0 * 3) / 2, (-1.0 * 2 + 2.0 * -1) / 2],
                     2: [-0.1, -0.1], 4: [(0.5 * 1 + 0.4 * 0.5) / 2, (0.5 * 2 + 0.4 * 0.5) / 2]}
    for row, mean in expected_mean.items():
        assert moments.exp_avg[row].tolist() == pytest.approx([0.1 * x for x in mean])
        assert moments.exp_avg_sq[row].tolist() == pytest.approx([0.01 * x * x for x in mean])
    assert moments.exp_avg[3].tolist() == [0.0, 0.0] and moments.exp_avg[5].tolist() == [7.0, 7.0]
    assert moments.t == 1 and moments.fed and moments.as_args()[5] == 1
    empty = CAPOMoments(6, 2)
    empty.update(hidden[:0], coef[:0], rows[:0])  # every token masked: t advances, still empty (SGD)
    assert empty.t == 1 and empty.as_args() is None


def test_mask_rules_follow_the_official_switches():
    m_H = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5])
    m_F = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0])
    assert keep_tokens(m_H, m_F, tau_H=0.1, tau_F=0.1, symmetric=True).tolist() == [False, True, False, True, False]
    assert keep_tokens(m_H, m_F, tau_H=0.1, tau_F=0.1, symmetric=False).tolist() == [False, False, False, True, False]
    assert keep_tokens(m_H, m_F, tau_H=0.0, tau_F=0.1, symmetric=True).tolist() == [True, True, False, True, True]
    assert keep_tokens(m_H, m_F, tau_H=0.0, tau_F=0.0, symmetric=False).all()
