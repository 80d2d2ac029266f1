"""The trainer's [objective] section (loss.objective = "policy": TRL's loss types on the vocabulary primitive),
the HF engine's sampled log-probs for the rollout correction, adaptive entropy control, and what a non-finite
loss does to a run (on_nonfinite)."""

import math

import pytest
import torch
from helpers import rel_err
from test_trainer import fake_reward_and_cpu_paths, read_metrics, tiny_cfg  # noqa: F401 (the autouse fixture)

pytest.importorskip("transformers")
from gxpo_kernels.loss.objectives import LOSS_TYPES  # noqa: E402
from trainer import train as train_module  # noqa: E402
from trainer.closure import LossClosure, NonFiniteLoss, skips_zero_advantages  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engines import make_engine  # noqa: E402
from trainer.models import load_policy  # noqa: E402
from trainer.policy import PolicyRunner  # noqa: E402

POLICY = {"loss.objective": "policy"}
quiet = lambda *_: None  # noqa: E731


def closure_gradient(cfg, adv=None, sampled_shift=0.0):
    """(gradient, closure) of one closure call on a fixed batch of 8 completions."""
    torch.manual_seed(0)
    model, tok = load_policy("tiny-random", torch.float32)
    runner = PolicyRunner(model)
    batch = make_engine("hf", runner, tok, cfg.rollout).generate(["user: 1 + 1\nassistant: "] * 2, 4, [0, 1])
    if sampled_shift:
        batch.sampled_logp = batch.sampled_logp + sampled_shift * batch.completion_mask
    ref = None
    if cfg.objective.beta:
        noise = torch.randn(batch.sampled_logp.shape, generator=torch.Generator().manual_seed(1))
        ref = batch.sampled_logp + 0.1 * noise
    model.zero_grad()
    closure = LossClosure(runner, batch, torch.linspace(-1, 1, 8) if adv is None else adv, cfg, ref)
    closure()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), closure


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_give_the_whole_batch_gradient_for_each_loss_type(tmp_path, loss_type):
    grads = []
    for micro in (0, 3):
        cfg = tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.loss_type": loss_type, "objective.beta": 0.04,
                                                      "objective.entropy_coef": 0.01, "loss.pack": "false",
                                                      "loss.micro_batch_size": micro})
        grads.append(closure_gradient(cfg)[0])
    assert grads[0].abs().max() > 0
    assert rel_err(grads[1], grads[0]) < 1e-5, loss_type


def test_packed_micro_batches_give_the_padded_gradient(tmp_path):
    grads = [closure_gradient(tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.importance_sampling_level":
                                                                      "sequence", **extra}))[0]
             for extra in ({"loss.pack": "false"}, {"loss.max_tokens_per_micro_batch": 40})]
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_policy_objective_trains_and_logs_trls_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path, "gxpo", steps=2, **POLICY, **{
        "objective.loss_type": "grpo", "objective.importance_sampling_level": "sequence", "objective.beta": 0.04,
        "objective.rollout_correction": "token_truncate", "objective.dual_clip_c": 3.0})
    rows = read_metrics(train_module.train(cfg, log=quiet))
    assert [r["backward_passes"] for r in rows] == [3, 6]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["kl_mean"] >= 0 and r["entropy_mean"] > 0
        assert 0 < r["sampling/importance_sampling_ratio/min"] <= r["sampling/importance_sampling_ratio/max"] <= 3
        assert r["clip_ratio/low_min"] <= r["clip_ratio/region_mean"] <= 1 and "clip_ratio/dual_mean" in r
        assert r["rollout/logp_abs_diff"] < 1e-4  # HF's sampled log-probs are the trainer's own


def test_hf_engines_sampled_logp_is_the_policys_at_the_temperature(tmp_path):
    for top_p in (1.0, 0.9):
        cfg = tiny_cfg(tmp_path, "grpo", **POLICY, **{"rollout.temperature": 0.7, "rollout.top_p": top_p})
        torch.manual_seed(0)
        model, tok = load_policy("tiny-random", torch.float32)
        runner = PolicyRunner(model)
        batch = make_engine("hf", runner, tok, cfg.rollout).generate(["user: 1 + 1\nassistant: "] * 2, 4, [0, 1])
        with torch.no_grad():
            logp, _ = runner("token_logprobs", batch, slice(None), temperature=0.7)
        mask = batch.completion_mask
        gap = ((batch.sampled_logp - logp).abs() * mask).max()
        if top_p == 1.0:
            assert gap < 1e-4
        else:  # the nucleus renormalized: never below the full distribution's log-prob
            assert ((batch.sampled_logp - logp) * mask).min() > -1e-4 and (batch.sampled_logp * mask).max() <= 1e-6


def test_rollout_correction_weighs_the_gradient_by_the_engines_log_probs(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.rollout_correction": "sequence_truncate",
                                                  "objective.rollout_clip_max": 100.0})
    same, _ = closure_gradient(cfg)
    shifted, closure = closure_gradient(cfg, sampled_shift=-0.05)  # the engine thought each token less likely
    ratios = [closure.last_metrics[f"sampling/importance_sampling_ratio/{s}"] for s in ("min", "max")]
    assert all(r > 1 for r in ratios) and rel_err(shifted, same) > 1e-3


def test_zero_advantage_skipping_only_where_exact(tmp_path):
    assert skips_zero_advantages(tiny_cfg(tmp_path, "grpo", **POLICY))
    for extra in ({"objective.beta": 0.04}, {"objective.entropy_coef": 0.01},
                  {"objective.top_entropy_quantile": 0.5}, {"loss.use_adaptive_entropy": "true"}):
        assert not skips_zero_advantages(tiny_cfg(tmp_path, "grpo", **POLICY, **extra)), extra
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.5, 0.0, -0.5])
    skipped = closure_gradient(tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.loss_type": "bnpo"}), adv)[0]
    kept = closure_gradient(tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.loss_type": "bnpo",
                                                                     "loss.skip_zero_advantage": "false"}), adv)[0]
    assert rel_err(skipped, kept) < 1e-5


@pytest.mark.parametrize("overrides,match", [
    ({"objective.beta": "0.1"}, "objective.beta"),
    ({"loss.objective": "policy", "loss.beta": "0.1"}, "set objective.beta"),
    ({"loss.objective": "policy", "loss.log_ratio_clamp": "20"}, "loss.log_ratio_clamp"),
    ({"loss.objective": "trl"}, "loss.objective"),
    ({"loss.use_adaptive_entropy": "true"}, "loss.use_adaptive_entropy"),
    ({"loss.objective": "policy", "objective.loss_type": "ppo"}, "objective.loss_type"),
    ({"loss.objective": "policy", "objective.top_entropy_quantile": "1.5"}, "objective.top_entropy_quantile"),
    ({"loss.objective": "policy", "loss.entropy_coef_min": "2"}, "loss.entropy_coef_max"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
])
def test_bad_objective_config_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=list(overrides.items()))


def test_dr_grpos_normalizer_defaults_to_max_new_tokens(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo", **POLICY, **{"objective.loss_type": "dr_grpo"})
    assert cfg.objective.max_completion_length == cfg.rollout.max_new_tokens == 12


def test_adaptive_entropy_steps_the_coefficient_and_resumes_exactly(tmp_path):
    extra = {**POLICY, "loss.use_adaptive_entropy": "true", "objective.entropy_coef": 0.1,
             "loss.entropy_coef_delta": 0.05, "loss.entropy_target": 100.0}  # entropy below target: it grows
    straight = read_metrics(train_module.train(tiny_cfg(tmp_path / "a", "grpo", steps=4, **extra), log=quiet))
    assert [r["entropy_coef"] for r in straight] == pytest.approx([0.0, 0.15, 0.2, 0.25])  # inf entropy at first
    train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=2, **extra), log=quiet)
    resumed = read_metrics(train_module.train(tiny_cfg(tmp_path / "b", "grpo", steps=4, resume=True, **extra),
                                              log=quiet))
    for a, b in zip(straight, resumed, strict=True):
        assert a["entropy_coef"] == b["entropy_coef"] and a["loss"] == b["loss"], a["step"]


def poison_at(monkeypatch, poisoned_step: int) -> dict:
    """The final norm's weight NaN while the closure runs at poisoned_step (1-based), restored after; the
    parameters before and after that step's update land in the returned dict."""
    real_update = train_module.Trainer.update
    seen = {}

    def update(self, step, *args):
        if step + 1 != poisoned_step:
            return real_update(self, step, *args)
        weight = self.model.model.norm.weight
        saved = weight.detach().clone()
        seen["before"] = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            weight[0] = float("nan")
        try:
            return real_update(self, step, *args)
        finally:
            with torch.no_grad():
                weight[0] = torch.where(torch.isnan(weight[0]), saved[0], weight[0])
            seen["after"] = [p.detach().clone() for p in self.model.parameters()]

    monkeypatch.setattr(train_module.Trainer, "update", update)
    return seen


@pytest.mark.parametrize("objective", ["grpo_kernels", "policy"])
def test_a_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, objective):
    poison_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLoss, match="step 2: pass 1's loss.*--resume"):
        train_module.train(tiny_cfg(tmp_path, "grpo", steps=3, **{"loss.objective": objective}), log=quiet)


@pytest.mark.parametrize("algo", ["grpo", "gxpo"])
def test_skip_leaves_the_weights_as_before_the_step(tmp_path, monkeypatch, algo):
    clean = read_metrics(train_module.train(tiny_cfg(tmp_path / "clean", algo, steps=3), log=quiet))
    seen = poison_at(monkeypatch, 2)
    rows = read_metrics(train_module.train(tiny_cfg(tmp_path / "skip", algo, steps=3, on_nonfinite="skip"),
                                           log=quiet))
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0]
    assert rows[1]["loss"] is None and math.isfinite(rows[2]["loss"])  # NaN is written as null
    assert rows[0]["loss"] == clean[0]["loss"]
    for before, after in zip(seen["before"], seen["after"], strict=True):
        assert torch.equal(before, after)
