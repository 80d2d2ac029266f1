"""fused_linear_grpo_loss against the materialized float64 reference, and its memory bound."""

import pytest
import torch
from helpers import loss_batch, loss_close, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference
from gxpo_kernels.loss.settings import LOSS_AGGS

TOL = 1e-5


def linear_batch(B, T, H, V, seed, bias=True, **kw):
    batch = loss_batch(B, T, V, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    batch["hidden"] = torch.randn(B, T, H, generator=g)
    batch["weight"] = torch.randn(V, H, generator=g) / H**0.5
    batch["bias"] = torch.randn(V, generator=g) * 0.1 if bias else None
    return batch


def run_both(batch, chunk_tokens=None, impl="auto", **kw):
    if kw.get("loss_agg") == "seq-mean-token-sum-norm":
        kw["max_completion_len"] = batch["ids"].shape[1]
    ref_logp = batch["ref"] if kw.get("beta", 0) > 0 else None
    leaves = [t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"])]
    bias = None if batch["bias"] is None else batch["bias"].clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(*leaves, batch["ids"], batch["adv"], batch["mask"], batch["old"],
                                           ref_logp, lm_head_bias_V=bias, chunk_tokens=chunk_tokens, impl=impl, **kw)
    loss.backward()

    leaves64 = [t.double().requires_grad_() for t in (batch["hidden"], batch["weight"])]
    bias64 = None if bias is None else batch["bias"].double().requires_grad_()
    logits64 = leaves64[0] @ leaves64[1].t() + (0 if bias64 is None else bias64)
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    loss64, metrics64 = grpo_loss_reference(logits64, batch["ids"], dbl(batch["adv"]), batch["mask"],
                                            dbl(batch["old"]), dbl(ref_logp), **kw)
    loss64.backward()
    assert loss_close(loss, loss64)
    for ours, ref in zip(leaves + [bias], leaves64 + [bias64], strict=True):
        if ref is not None:
            assert torch.isfinite(ours.grad).all()
            assert rel_err(ours.grad, ref.grad) < TOL
    assert set(metrics) == set(metrics64)
    for name in metrics64:
        assert rel_err(metrics[name], metrics64[name]) < TOL, name


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_matches_materialized_reference(path, loss_agg):
    batch = linear_batch(4, 6, 24, 130, seed=11)
    run_both(batch, chunk_tokens=5, loss_agg=loss_agg, beta=0.05, eps_high=0.28)


@pytest.mark.parametrize("chunk_tokens", [None, 1, 7, 64])
def test_chunk_sizes(path, chunk_tokens):
    batch = linear_batch(3, 7, 16, 97, seed=12)
    run_both(batch, chunk_tokens=chunk_tokens, dual_clip_c=1.5, temperature=0.8, return_entropy=True)


def test_no_bias_and_frozen_weight(path):
    batch = linear_batch(3, 5, 16, 64, seed=13, bias=False)
    hidden = batch["hidden"].clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(hidden, batch["weight"], batch["ids"], batch["adv"], batch["mask"],
                                     batch["old"], chunk_tokens=4)
    loss.backward()
    h64 = batch["hidden"].double().requires_grad_()
    grpo_loss_reference(h64 @ batch["weight"].double().t(), batch["ids"], batch["adv"].double(), batch["mask"],
                        batch["old"].double())[0].backward()
    assert rel_err(hidden.grad, h64.grad) < TOL
    run_both(batch, chunk_tokens=4)


def test_same_as_grpo_loss_on_materialized_logits():
    batch = linear_batch(3, 5, 16, 64, seed=14)
    loss, metrics = fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["ids"], batch["adv"],
                                           batch["mask"], batch["old"], lm_head_bias_V=batch["bias"])
    logits = batch["hidden"] @ batch["weight"].t() + batch["bias"]
    loss2, metrics2 = grpo_loss(logits, batch["ids"], batch["adv"], batch["mask"], batch["old"])
    assert loss_close(loss, loss2) and rel_err(metrics["logp_BT"], metrics2["logp_BT"]) < TOL


def test_all_masked_gives_zero_loss_and_grads(path):
    batch = linear_batch(2, 4, 8, 32, seed=15)
    hidden, weight, bias = (t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"], batch["bias"]))
    loss, metrics = fused_linear_grpo_loss(hidden, weight, batch["ids"], batch["adv"],
                                           torch.zeros(2, 4, dtype=torch.bool), lm_head_bias_V=bias)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert all(torch.isfinite(v).all() for v in metrics.values())


class LargestAllocation(TorchDispatchMode):
    """Largest tensor (in elements) returned by an op that allocates; in-place ops and the Triton
    interpreter's byte-wise storage copies (set_/copy_) are not new tensors."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not name.endswith("_") and func._overloadname != "out":
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materializes_full_logits(path):
    B, T, H, V, chunk = 4, 16, 8, 200, 8
    batch = linear_batch(B, T, H, V, seed=16)
    batch["mask"][:] = True
    hidden, weight = (t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"]))
    with LargestAllocation() as probe:
        loss, _ = fused_linear_grpo_loss(hidden, weight, batch["ids"], batch["adv"], batch["mask"],
                                         batch["old"], chunk_tokens=chunk)
        loss.backward()
    assert probe.max_numel <= chunk * V < B * T * V
    with LargestAllocation() as probe_materialized:  # the probe does see a full [N, V] tensor
        hidden @ weight.t()
    assert probe_materialized.max_numel == B * T * V
