"""Every documented ValueError of grpo_loss / fused_linear_grpo_loss names the bad argument."""

import pytest
import torch

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss

B, T, V, H = 2, 3, 11, 4


def good():
    return {
        "logits_BTV": torch.randn(B, T, V),
        "completion_ids_BT": torch.randint(0, V, (B, T)),
        "advantages_B": torch.randn(B),
        "completion_mask_BT": torch.ones(B, T, dtype=torch.bool),
    }


BAD = [
    ({"completion_ids_BT": torch.zeros(B, T + 1, dtype=torch.long)}, "completion_ids_BT must have shape"),
    ({"completion_ids_BT": torch.zeros(B, T)}, "completion_ids_BT must be an integer tensor"),
    ({"completion_ids_BT": torch.full((B, T), V)}, r"outside \[0, 11\)"),
    ({"completion_ids_BT": torch.full((B, T), -1)}, r"outside \[0, 11\)"),
    ({"advantages_B": torch.randn(B + 1)}, "advantages_B must have shape"),
    ({"advantages_B": torch.tensor([0.0, float("nan")])}, "advantages_B has NaN"),
    ({"advantages_B": torch.tensor([0.0, float("inf")])}, "advantages_B has NaN or inf"),
    ({"completion_mask_BT": torch.ones(B, T + 1)}, "completion_mask_BT must have shape"),
    ({"completion_mask_BT": torch.full((B, T), 0.5)}, "only 0/1"),
    ({"old_logp_BT": torch.zeros(B, 1)}, "old_logp_BT must have shape"),
    ({"old_logp_BT": torch.full((B, T), float("nan"))}, "old_logp_BT has NaN"),
    ({"loss_agg": "sum"}, "unknown loss_agg 'sum'"),
    ({"eps_low": 0.0}, r"eps_low must be in \(0, 1\)"),
    ({"eps_high": 1.5}, r"eps_high must be in \(0, 1\)"),
    ({"dual_clip_c": 1.0}, "dual_clip_c must be > 1"),
    ({"beta": 0.1}, "beta > 0 needs ref_logp_BT"),
    ({"beta": -0.1}, "beta must be >= 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"loss_agg": "seq-mean-token-sum-norm"}, "needs max_completion_len"),
    ({"logits_BTV": torch.randn(B, T)}, "logits_BTV must be a floating-point tensor with 3 dims"),
    ({"logits_BTV": torch.zeros(0, T, V), "completion_ids_BT": torch.zeros(0, T, dtype=torch.long),
      "advantages_B": torch.zeros(0), "completion_mask_BT": torch.zeros(0, T)}, "empty batch"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_grpo_loss_rejects(override, message):
    with pytest.raises(ValueError, match=message):
        grpo_loss(**{**good(), **override})


def test_masked_positions_may_hold_padding():
    """Out-of-range ids and NaN old log-probs under the mask are padding, not errors."""
    args = good()
    args["completion_mask_BT"][0, -1] = False
    args["completion_ids_BT"][0, -1] = -100
    old = torch.zeros(B, T)
    old[0, -1] = float("nan")
    loss, _ = grpo_loss(**args, old_logp_BT=old)
    assert torch.isfinite(loss)


def fused_args():
    args = good()
    del args["logits_BTV"]
    return {"hidden_BTH": torch.randn(B, T, H), "lm_head_weight_VH": torch.randn(V, H), **args}


FUSED_BAD = [
    ({"lm_head_weight_VH": torch.randn(V, H + 1)}, r"lm_head_weight_VH must have shape \[V, 4\]"),
    ({"lm_head_weight_VH": torch.randn(V, H, dtype=torch.float64)}, "lm_head_weight_VH is torch.float64"),
    ({"lm_head_bias_V": torch.randn(V + 1)}, "lm_head_bias_V must have shape"),
    ({"chunk_tokens": 0}, "chunk_tokens must be a positive int"),
    ({"hidden_BTH": torch.randn(B, T)}, "hidden_BTH must be a floating-point tensor with 3 dims"),
    ({"completion_ids_BT": torch.full((B, T), V)}, r"outside \[0, 11\)"),
]


@pytest.mark.parametrize("override,message", FUSED_BAD, ids=[m for _, m in FUSED_BAD])
def test_fused_linear_rejects(override, message):
    with pytest.raises(ValueError, match=message):
        fused_linear_grpo_loss(**{**fused_args(), **override})
