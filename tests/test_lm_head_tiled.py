"""The tiled LM-head GRPO loss (impl="tiled": logits never in memory) against the float64 materialized
reference: loss, metrics and d_hidden, d_weight, d_bias at shapes off the tile sizes, ragged masks, every
loss_agg; gradient filtering within its documented bound; no [N, V] allocation; clear errors."""

import pytest
import torch
from helpers import rel_err
from test_fused_linear_grpo_loss import TOL, LargestAllocation, linear_batch, run_both

from gxpo_kernels import fused_linear_grpo_loss
from gxpo_kernels.loss.lm_head_kernels import tile_config
from gxpo_kernels.loss.reference import grpo_loss_reference
from gxpo_kernels.loss.settings import LOSS_AGGS


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_every_loss_agg(loss_agg):
    # H = 40, V = 130: neither a multiple of the interpreter's tiles (16, 32); ragged masks
    run_both(linear_batch(4, 9, 40, 130, seed=21), impl="tiled", loss_agg=loss_agg, beta=0.05, eps_high=0.28,
             return_entropy=True)


@pytest.mark.parametrize("B,T,H,V,bias", [(1, 1, 16, 32, True), (3, 7, 17, 97, False), (5, 8, 48, 257, True)])
def test_shapes_temperature_dual_clip(B, T, H, V, bias):
    run_both(linear_batch(B, T, H, V, seed=22 + V, bias=bias), impl="tiled", temperature=0.7, dual_clip_c=1.5,
             return_entropy=True, log_ratio_clamp=3.0)


def test_splits_cover_the_vocabulary():
    cfg = tile_config(36, 257, 48, torch.device("cpu"))
    assert cfg["splits"] > 1 and (cfg["splits"] - 1) * cfg["tiles_per_split"] < -(-257 // cfg["BLOCK_V"])


def test_frozen_weight_and_grad_output():
    batch = linear_batch(3, 5, 24, 70, seed=23)
    hidden = batch["hidden"].clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(hidden, batch["weight"], batch["ids"], batch["adv"], batch["mask"],
                                     batch["old"], lm_head_bias_V=batch["bias"], impl="tiled")
    (loss * 2.5).backward()
    h64 = batch["hidden"].double().requires_grad_()
    logits64 = h64 @ batch["weight"].double().t() + batch["bias"].double()
    loss64, _ = grpo_loss_reference(logits64, batch["ids"], batch["adv"].double(), batch["mask"],
                                    batch["old"].double())
    (loss64 * 2.5).backward()
    assert rel_err(hidden.grad, h64.grad) < TOL


def _grads(batch, filter_eps):
    leaves = [t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"], batch["bias"])]
    loss, _ = fused_linear_grpo_loss(leaves[0], leaves[1], batch["ids"], batch["adv"], batch["mask"], batch["old"],
                                     lm_head_bias_V=leaves[2], impl="tiled", filter_eps=filter_eps)
    loss.backward()
    return [t.grad for t in leaves]


def test_filtering_stays_within_its_bound():
    batch = linear_batch(4, 12, 24, 1000, seed=24)  # 32 vocabulary tiles: many hold no target
    batch["weight"] *= 4  # a peaked softmax: most tiles hold only small probabilities
    eps = 0.02
    exact, filtered = _grads(batch, 0.0), _grads(batch, eps)
    # |c_n| from the float64 reference: sum_v |dlogits_nv| = 2 |c_n| (1 - p_n,target)
    logits64 = (batch["hidden"].double() @ batch["weight"].double().t() + batch["bias"].double()).requires_grad_()
    loss64, _ = grpo_loss_reference(logits64, batch["ids"], batch["adv"].double(), batch["mask"],
                                    batch["old"].double())
    loss64.backward()
    V = logits64.shape[-1]
    p_target = torch.softmax(logits64.detach(), -1).gather(2, batch["ids"][..., None]).squeeze(2)
    c_N = (logits64.grad.abs().sum(-1) / (2 * (1 - p_target)).clamp(min=1e-12)).reshape(-1)
    h_NH, w_VH = batch["hidden"].double().flatten(0, 1), batch["weight"].double()
    bounds = [eps * c_N[:, None] * w_VH.abs().sum(0)[None, :],  # d_hidden [N, H]
              eps * (c_N[:, None] * h_NH.abs()).sum(0)[None, :].expand_as(w_VH),  # d_weight [V, H]
              eps * c_N.sum().expand(V)]  # d_bias [V]
    changed = 0
    for ours, full, bound in zip(filtered, exact, bounds, strict=True):
        delta = (ours.double() - full.double()).reshape(bound.shape).abs()
        slack = 1e-5 * full.abs().max().double()  # fp32 accumulation-order differences
        assert (delta <= bound + slack).all(), float((delta - bound).max())
        changed += int((delta > slack).sum())
    assert changed > 0, "nothing was filtered: the test would not see a violated bound"


def test_no_full_logits_allocated():
    B, T, H, V = 4, 16, 8, 200
    batch = linear_batch(B, T, H, V, seed=25)
    batch["mask"][:] = True
    hidden, weight, bias = (t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"], batch["bias"]))
    with LargestAllocation() as probe:
        loss, _ = fused_linear_grpo_loss(hidden, weight, batch["ids"], batch["adv"], batch["mask"], batch["old"],
                                         lm_head_bias_V=bias, impl="tiled", return_entropy=True)
        loss.backward()
    splits = tile_config(B * T, V, H, hidden.device)["splits"]
    assert probe.max_numel <= max(B * T * H, V * H, 4 * splits * B * T) < B * T * V


@pytest.mark.parametrize("kwargs,message", [
    ({"impl": "cce"}, "impl must be one of"),
    ({"impl": "tiled", "chunk_tokens": 8}, "chunk_tokens applies"),
    ({"impl": "chunked", "filter_eps": 0.01}, "filter_eps applies"),
    ({"impl": "tiled", "filter_eps": 1.5}, "filter_eps must be in"),
])
def test_errors_name_the_argument(kwargs, message):
    batch = linear_batch(2, 3, 16, 40, seed=26)
    with pytest.raises(ValueError, match=message):
        fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["ids"], batch["adv"], batch["mask"], **kwargs)


def test_tiled_needs_triton():
    batch = linear_batch(2, 3, 16, 40, seed=27)
    with pytest.raises(ValueError, match="impl='chunked'"):
        fused_linear_grpo_loss(batch["hidden"].double(), batch["weight"].double(), batch["ids"], batch["adv"],
                               batch["mask"], impl="tiled")


@pytest.mark.parametrize("impl", ["tiled", "chunked"])
def test_cpu_twin_of_the_gpu_precision_check(impl):
    """tests/test_gpu_bf16.py's comparison, run here in fp32: it must see three distinct gradients."""
    from precision_checks import SETTINGS, assert_within_twice_torch, fused_linear_vs_torch

    batch = linear_batch(2, 9, 24, 70, seed=28)
    args = (batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"])
    assert_within_twice_torch(*fused_linear_vs_torch(batch["hidden"], batch["weight"], args, SETTINGS, impl,
                                                     torch.float32))


@pytest.mark.parametrize("bias_value", [100.0, -100.0])
def test_padded_rows_never_reach_the_gradients(bias_value):
    """17 tokens: the second 16-row tile has 15 padded rows, whose logits are the bias alone. A bias of 100
    overflowed exp there (0 x inf = NaN in d_weight and d_bias); -100 everywhere: all-negative logits."""
    batch = linear_batch(1, 17, 16, 40, seed=29)
    batch["mask"][:] = True
    batch["old"] = None  # on-policy: rho = 1, so the gradients stay O(1) however peaked the softmax is
    if bias_value > 0:
        batch["bias"][7] = bias_value
    else:
        batch["bias"] += bias_value
    run_both(batch, impl="tiled", return_entropy=bias_value < 0)  # +100: entropy ~1e-40, no relative error
