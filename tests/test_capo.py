"""CAPO scores: the gathered quadratic form (Triton under the interpreter, and the chunked torch path)
and m_H, m_F against the float64 reference that materializes the per-token gradients."""

import pytest
import torch
from helpers import rel_err

from trainer.plugins.capo import kernels as capo
from trainer.plugins.capo.kernels import capo_reference, capo_scores, gathered_quadratic


def inputs(N, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    actions = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g, dtype=dtype)
    precond = 1 / (torch.rand(V, H, generator=g, dtype=dtype).sqrt() + 1e-3)
    return hidden, weight, actions, adv, precond


@pytest.mark.parametrize("N,H,V,K", [(1, 8, 16, 4), (37, 24, 100, 7), (21, 130, 300, 9)])
def test_gathered_quadratic(N, H, V, K, path, monkeypatch):
    monkeypatch.setattr(capo, "MAX_BLOCK_H", 32)  # several blocks along H, the last one partial
    hidden, _, _, _, precond = inputs(N, H, V, seed=N)
    rows = torch.randint(0, V, (N, K), generator=torch.Generator().manual_seed(1))
    q = gathered_quadratic(hidden, precond, rows, chunk_tokens=16)
    ref = torch.einsum("nkh,nh->nk", precond.double()[rows], hidden.double().square())
    assert rel_err(q, ref) < 1e-5


@pytest.mark.parametrize("N,H,V,K", [(5, 16, 40, 8), (37, 48, 300, 50), (70, 20, 129, 3)])
def test_scores_match_the_materialized_reference(N, H, V, K, path):
    hidden, weight, actions, adv, precond = inputs(N, H, V, seed=7 + N)
    m_H, m_F = capo_scores(hidden, weight, actions, adv, precond, lr=1e-3, top_k=K, chunk_tokens=32)
    ref_H, ref_F = capo_reference(hidden, weight, actions, adv, precond, lr=1e-3, top_k=K)
    assert rel_err(m_H, ref_H) < 1e-5 and rel_err(m_F, ref_F) < 1e-5
    assert (m_F >= 0).all()


def test_sampled_token_outside_the_top_k_is_forced_in():
    hidden, weight, actions, adv, precond = inputs(4, 8, 64, seed=3)
    logits = hidden @ weight.t()
    actions = logits.argmin(1)  # the least likely token: never in the top 4
    m_H, m_F = capo_scores(hidden, weight, actions, adv, precond, lr=1e-2, top_k=4)
    ref_H, ref_F = capo_reference(hidden, weight, actions, adv, precond, lr=1e-2, top_k=4)
    assert rel_err(m_H, ref_H) < 1e-5 and (m_F > 0).all()  # v = e_a - pi is never zero there
