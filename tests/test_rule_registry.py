"""Update rules through their registry: each rule's knobs declared once (its RuleConfig), every registered
rule built from its config and stepped, a new rule added as one file plus one registry line and reachable
from the trainer's config, the CLI, gxpo-bench and TRL."""

import dataclasses
import inspect

import pytest
import torch

from gxpo_kernels.optim import RULES, register
from gxpo_kernels.optim.registry import rule_config


def tiny_closure(model, x):
    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss, {"entropy_mean": 1.0}
    return closure


@pytest.fixture
def sign_rule():
    from example_rule import SignRuleConfig

    register(SignRuleConfig)  # the one registry line
    yield SignRuleConfig
    del RULES["sign"]


@pytest.mark.parametrize("name", list(RULES))
def test_every_registered_rule_builds_from_its_config_and_steps(name):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    rule = RULES[name]().build(model.parameters(), lr=1e-2)
    assert isinstance(rule, RULES[name].rule) and rule.config == RULES[name]().resolved()
    rule.step(tiny_closure(model, x))
    assert rule.backward_passes >= 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def _valid_value(config, field):
    return getattr(config.resolved(), field.name)


def test_each_knob_is_declared_once_and_reachable_from_the_trainer_and_trl():
    """Every field of every rule's config: set from the trainer's config (as --<rule>.<field> is) and through
    TRL's rule_kwargs, and declared in no rule's constructor (which takes the config whole or its fields as
    keywords)."""
    pytest.importorskip("transformers")
    from trainer.config import load_config

    for name, config_cls in RULES.items():
        config = config_cls()
        params = inspect.signature(config_cls.rule.__init__).parameters
        for f in dataclasses.fields(config_cls):
            assert f.name not in params, f"{config_cls.rule.__name__}.__init__ declares {f.name} again"
            value = _valid_value(config, f)
            cfg = load_config(overrides=[(f"{name}.{f.name}", "none" if value is None else str(value))])
            assert getattr(cfg.rules[name], f.name) == value, (name, f.name)
            assert getattr(rule_config(name, **{f.name: value}).resolved(), f.name) == value


@pytest.mark.parametrize("key,value", [("gxpo.patience", "0"), ("gxpo.fallback", "sometimes"), ("gxpo.omega", "2"),
                                       ("gxpo.delta", "0"), ("sfpo.fallback_window", "0"), ("sfpo.K", "0")])
def test_every_knob_is_checked_and_named_by_its_key(key, value):
    pytest.importorskip("transformers")
    from trainer.config import load_config

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides=[(key, value)])


def test_unknown_rules_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown update rule 'adam'"):
        rule_config("adam")
    with pytest.raises(ValueError, match=r"has no field \['beta'\]"):
        rule_config("gxpo", beta=0.1)
    with pytest.raises(ValueError, match="pass them in config or as keywords"):
        RULES["gxpo"].rule(torch.nn.Linear(2, 2).parameters(), config=RULES["gxpo"](), alpha=0.3)


def test_a_new_rule_is_one_file_and_one_registry_line(sign_rule, tmp_path):
    pytest.importorskip("transformers")
    from trainer.closure import make_update_rule
    from trainer.config import load_config, to_toml

    cfg = load_config(overrides=[("algo", "sign"), ("sign.scale", "0.5"), ("optim.weight_decay", "0")])
    assert cfg.rule == sign_rule(scale=0.5) and "[sign]\nscale = 0.5" in to_toml(cfg)
    with pytest.raises(ValueError, match=r"sign\.scale"):
        load_config(overrides=[("algo", "sign"), ("sign.scale", "-1")])
    model, x = torch.nn.Linear(3, 1, bias=False), torch.tensor([[1.0, -2.0, 3.0]])
    rule = make_update_rule(cfg, list(model.parameters()))
    assert isinstance(rule, sign_rule.rule) and rule.config.scale == 0.5
    sgd = cfg.rule.build(model.parameters(), torch.optim.SGD, lr=1.0)
    before = model.weight.detach().clone()
    with torch.no_grad():
        expected = 0.5 * (2 * model(x) * x).sign()  # d (w.x)^2 / dw
    sgd.step(tiny_closure(model, x))
    assert torch.equal(before - model.weight.detach(), expected)

    from gxpo_bench import cli

    with pytest.raises(ValueError, match=r"--algo: \['nope'\] not among grpo, sfpo, gxpo, sign"):
        cli.run_step(type("A", (), {"algo": "sign,nope"})())
    trl = pytest.importorskip("gxpo_kernels.trl")
    common = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], update_rule="sign")
    assert trl.GXPOConfig(**common, rule_kwargs={"scale": 0.25}).rule_config() == sign_rule(scale=0.25)
    with pytest.raises(ValueError, match="scale must be > 0"):
        trl.GXPOConfig(**common, rule_kwargs={"scale": -1.0})
