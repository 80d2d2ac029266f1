"""GXPO / SFPO presets in the trainer's config: resolved at load time, overridable field by field, and bad
values rejected before any model loads, naming section.field."""

import pytest

pytest.importorskip("transformers")
from trainer.config import load_config, to_toml  # noqa: E402


def test_presets_resolve_and_fields_override(tmp_path):
    cfg = load_config()
    assert (cfg.gxpo.preset, cfg.gxpo.K, cfg.gxpo.alpha, cfg.gxpo.tau, cfg.gxpo.gate, cfg.gxpo.gate_stat,
            cfg.gxpo.window, cfg.gxpo.warmup, cfg.gxpo.patience, cfg.gxpo.optimizer_state,
            cfg.gxpo.retention_space) == ("authors-1p5b", 3, 0.8, 3.0, "window_inclusive", "entropy", 30, 50, 3,
                                          "transactional", "auto")
    assert (cfg.sfpo.preset, cfg.sfpo.K, cfg.sfpo.alpha, cfg.sfpo.tau, cfg.sfpo.gate) == \
        ("official", 3, 0.8, 1.0, "window_inclusive")
    paper = load_config(overrides=[("gxpo.preset", "paper"), ("gxpo.tau", "0.7")])
    assert (paper.gxpo.K, paper.gxpo.gate, paper.gxpo.gate_stat, paper.gxpo.tau) == (5, "ema", "trajectory", 0.7)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(paper))
    again = load_config(path)
    assert again.gxpo == paper.gxpo  # config.toml records what ran


@pytest.mark.parametrize("key,value", [
    ("gxpo.alpha", "2"), ("gxpo.K", "1"), ("gxpo.gate", "bogus"), ("gxpo.gate_stat", "loss"), ("gxpo.tau", "0"),
    ("gxpo.preset", "best"), ("sfpo.alpha", "-1"), ("sfpo.window", "0"), ("sfpo.preset", "x"),
    ("gxpo.optimizer_state", "sometimes"), ("loss.log_ratio_clamp", "0"), ("optim.betas", "0.9"),
    ("optim.betas", "0.9,1.5"), ("optim.weight_decay", "-0.1"), ("optim.max_grad_norm", "0"),
    ("loss.eps_low", "1.5"), ("loss.eps_high", "0"), ("loss.beta", "-1"), ("loss.loss_agg", "mean"),
    ("loss.max_completion_len", "0"), ("eval.n_samples", "0"), ("capo.mode", "paper"), ("capo.tau_F", "-1"),
])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides=[(key, value)])


@pytest.mark.parametrize("key,value", [("gxpo.alpha", "2"), ("gxpo.K", "1"), ("gxpo.gate", "bogus"),
                                       ("sfpo.alpha", "-1"), ("optim.betas", "0.9"), ("capo.mode", "paper")])
def test_cli_rejects_bad_values_in_under_a_second_before_any_model_loads(key, value, monkeypatch):
    import time

    from trainer import cli, policy_stack

    monkeypatch.setattr(policy_stack, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "tiny-random", f"--{key}", value])
    assert time.perf_counter() - t0 < 1.0
    assert str(exit_info.value).startswith("gxpo-train: ") and f"'{key}'" in str(exit_info.value)
