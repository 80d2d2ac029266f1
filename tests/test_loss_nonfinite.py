"""A non-finite logit, LM-head weight, bias or hidden state never gives a finite loss: on-policy the GRPO loss's
value does not depend on the log-probs (the ratio is 1), so the kernels' loss alone would hide a diverged
policy. Every path (Triton interpreter and torch) and impl, the GRPO kernels and objective=."""

import pytest
import torch

from gxpo_kernels import backend
from gxpo_kernels.loss import PolicyObjective, fused_linear_grpo_loss, grpo_loss

B, T, V, H = 3, 5, 37, 16
OBJECTIVES = {"grpo_kernels": {}, "objective": {"objective": PolicyObjective()}}
LM_HEAD_PATHS = [("triton", "tiled"), ("triton", "chunked"), ("torch", "chunked")]  # tiled is Triton only


def _on_path(monkeypatch, path):
    if path == "torch":
        monkeypatch.setattr(backend, "use_triton", lambda t: False)
    assert backend.use_triton(torch.zeros(1)) == (path == "triton")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    return ids, torch.randn(B, generator=g), mask, g


def _logits(case, ids, g):
    logits = torch.randn(B, T, V, generator=g)
    if case == "one_nan":
        logits[0, 1, (ids[0, 1] + 1) % V] = float("nan")
    elif case == "all_nan":
        logits.fill_(float("nan"))
    elif case == "pos_inf":
        logits[2, 0, 3] = float("inf")
    elif case == "nan_target":
        logits[2, 4, ids[2, 4]] = float("nan")
    return logits


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("case", ["one_nan", "all_nan", "pos_inf", "nan_target"])
def test_logits_loss_is_nan(path, case, objective):
    ids, adv, mask, g = _batch()
    logits = _logits(case, ids, g).requires_grad_()
    loss, _ = grpo_loss(logits, ids, adv, mask, **OBJECTIVES[objective])
    assert torch.isnan(loss), f"{case}: loss {float(loss)} from non-finite logits"


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_logits_finite_where_only_masked_or_masked_vocab(path, objective):
    """A NaN at a masked token is never read; a -inf logit off the target is a masked-out vocabulary entry."""
    ids, adv, mask, g = _batch()
    logits = torch.randn(B, T, V, generator=g)
    logits[1, 4, :] = float("nan")  # mask[1, 3:] == 0
    logits[0, 2, (ids[0, 2] + 1) % V] = float("-inf")
    loss, _ = grpo_loss(logits.requires_grad_(), ids, adv, mask, **OBJECTIVES[objective])
    assert torch.isfinite(loss)


def _lm_head(case, g):
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    bias = torch.randn(V, generator=g)
    if case == "nan_weight":
        weight[7, 3] = float("nan")
    elif case == "inf_hidden":
        hidden[0, 2, 5] = float("inf")
    elif case == "nan_bias":
        bias[11] = float("nan")
    return hidden, weight, bias


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("path,impl", LM_HEAD_PATHS)
@pytest.mark.parametrize("case", ["nan_weight", "inf_hidden", "nan_bias"])
def test_lm_head_loss_is_nan(monkeypatch, path, impl, case, objective):
    _on_path(monkeypatch, path)
    ids, adv, mask, g = _batch(1)
    hidden, weight, bias = (x.requires_grad_() for x in _lm_head(case, g))
    loss, _ = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, lm_head_bias_V=bias, impl=impl,
                                     chunk_tokens=4 if impl == "chunked" else None, **OBJECTIVES[objective])
    assert torch.isnan(loss), f"{case} ({impl}): loss {float(loss)}"
    loss.backward()  # the backward still runs; the trainer's policy decides what happens to the step


@pytest.mark.parametrize("path,impl", LM_HEAD_PATHS)
def test_lm_head_finite_inputs_finite_loss(monkeypatch, path, impl):
    _on_path(monkeypatch, path)
    ids, adv, mask, g = _batch(2)
    hidden, weight, bias = _lm_head("finite", g)
    hidden[1, 4] = float("nan")  # a masked token's hidden state is never read
    loss, _ = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, lm_head_bias_V=bias, impl=impl)
    assert torch.isfinite(loss)
