"""GRPO as an update rule: one pass, torch's gradient clipping, one base step; the same interface and
checkpoint state as SFPO and GXPO."""

import copy

import pytest
import torch
from test_update_rules import make_closure, params_of, tiny_problem

from gxpo_kernels import GRPO, GXPO, FlatAdamW


@pytest.mark.parametrize("max_grad_norm", [None, 1e-2, 100.0])
def test_step_is_one_clipped_base_step(max_grad_norm):
    model, x, y = tiny_problem()
    by_hand = copy.deepcopy(model)
    rule = GRPO(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm)
    adamw = torch.optim.AdamW(by_hand.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = rule.step(make_closure(model, x, y))
        adamw.zero_grad()
        expected_loss = torch.nn.functional.mse_loss(by_hand(x), y)
        expected_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(by_hand.parameters(), max_grad_norm or float("inf"))
        adamw.step()
        assert torch.equal(loss, expected_loss) and rule.last_grad_norm == float(norm)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(by_hand), strict=True))
    assert rule.backward_passes == 3 and rule.steps == 3 and rule.last_stats == {}
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_gradient_skips_the_step():
    model, x, y = tiny_problem()
    before = params_of(model)
    rule = GRPO(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    rule.step(make_closure(model, x, y, poison_call=1))
    assert rule.last_grad_norm != rule.last_grad_norm  # NaN
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))


def test_state_dict_round_trip_and_scheduler():
    model, x, y = tiny_problem()
    rule = GRPO(model.parameters(), base=FlatAdamW, lr=1e-2, max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(rule, lambda s: 0.5 ** s)
    rule.step(make_closure(model, x, y))
    sched.step()
    assert rule.base.param_groups[0]["lr"] == pytest.approx(5e-3)
    saved_model, saved_rule = copy.deepcopy(model.state_dict()), copy.deepcopy(rule.state_dict())
    rule.step(make_closure(model, x, y))
    expected = params_of(model)
    model2, _, _ = tiny_problem(seed=1)
    model2.load_state_dict(saved_model)
    rule2 = GRPO(model2.parameters(), base=FlatAdamW, lr=5e-3, max_grad_norm=0.5)
    rule2.load_state_dict(saved_rule)
    rule2.step(make_closure(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model2), expected, strict=True))
    assert rule2.backward_passes == 2 and set(rule2.own_state_dict()) == {"backward_passes", "steps"}


def test_sharded_state_dict_names_parameters_and_restores_the_gate():
    model, x, y = tiny_problem()
    rule = GXPO(model.parameters(), lr=1e-2, preset="paper", tau=1e-9)
    rule.step(make_closure(model, x, y))
    state = rule.sharded_state_dict(model)
    assert set(state) == {"model", "optim", "rule"} and not rule.gate.open
    assert set(state["optim"]["state"]) == {name for name, _ in model.named_parameters()}
    fresh_model, _, _ = tiny_problem(seed=2)
    fresh = GXPO(fresh_model.parameters(), lr=1e-2, preset="paper", tau=1e-9)
    fresh.load_sharded_state_dict(fresh_model, copy.deepcopy(state))
    assert not fresh.gate.open and fresh.backward_passes == 3 and fresh.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params_of(fresh_model), params_of(model), strict=True))


def test_errors():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="closure"):
        GRPO(model.parameters(), lr=1e-2).step()
    with pytest.raises(ValueError, match="max_grad_norm"):
        GRPO(model.parameters(), lr=1e-2, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="allow_bf16_params"):
        GRPO([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=1e-2)
