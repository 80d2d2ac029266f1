"""The one policy-stack builder the Trainer, gxpo-bench step and the mixed-precision benchmark share."""

import pytest
import torch

pytest.importorskip("transformers")
from trainer.config import load_config  # noqa: E402
from trainer.policy_stack import build_policy_stack, stack_dtypes  # noqa: E402


def test_reference_is_a_frozen_copy_and_the_rule_is_the_configured_one():
    cfg = load_config(overrides=[("model", "tiny-random"), ("algo", "gxpo"), ("loss.beta", "0.04")])
    stack = build_policy_stack(cfg, torch.device("cpu"))
    assert type(stack.rule).__name__ == "GXPO" and stack.rule.config == cfg.rule and not stack.own_group
    ref = dict(stack.ref_runner.model.named_parameters())
    for name, p in stack.model.named_parameters():
        assert torch.equal(p, ref[name]) and p.requires_grad and not ref[name].requires_grad
    no_ref = build_policy_stack(load_config(overrides=[("model", "tiny-random")]), torch.device("cpu"),
                                with_rule=False)
    assert no_ref.ref_runner is None and no_ref.rule is None


def test_dtypes_follow_the_config():
    cfg = load_config(overrides=[("model", "tiny-random")])
    assert stack_dtypes(cfg, torch.device("cpu")) == (torch.float32, torch.float32)
    assert stack_dtypes(cfg, torch.device("cuda")) == (torch.float32, torch.bfloat16)
    bf16 = load_config(overrides=[("model", "tiny-random"), ("bf16_params", "true"), ("dtype", "bfloat16")])
    assert stack_dtypes(bf16, torch.device("cpu")) == (torch.bfloat16, torch.bfloat16)
