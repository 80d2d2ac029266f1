"""The policy objectives (gxpo_kernels.loss.objectives) against stock TRL 1.16's GRPOTrainer._compute_loss on
the same per-token log-probs and entropies: loss, its gradients with respect to both, and every metric TRL
logs, in float64, over every loss type x importance-sampling level x rollout-correction mode TRL allows,
with micro-batches (gradient accumulation, dapo's generation-batch normalizer)."""

import itertools
import zlib

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gxpo_kernels.loss.objectives import LOSS_TYPES, PolicyObjective, metric_names, policy_loss, rollout_ratio  # noqa: E402
from trainer.models import tiny_random_model, tiny_tokenizer  # noqa: E402

B, T = 6, 7
MODES = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    tok = tiny_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=T, use_cpu=True, report_to=[], bf16=False)
    trainer = GRPOTrainer(model=tiny_random_model(tok, seed=0), reward_funcs=lambda completions, **_: [0.0] *
                          len(completions), args=args, train_dataset=Dataset.from_list([{"prompt": "1"}] * 4),
                          processing_class=tok)
    trainer.model.train()
    return trainer


def batch(seed, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[0] = 0  # a sequence with no tokens
    mask[1] = 1
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    shift = lambda scale: logp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    sampling = shift(0.05)
    sampling[2, 1] = float("nan")  # a token the engine could not score
    return dict(
        logp=logp, entropy=torch.rand(B, T, generator=g, dtype=torch.float64) * 2, mask=mask,
        adv=torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv
        else torch.randn(B, generator=g, dtype=torch.float64),
        old=shift(0.3), ref=shift(0.2), sampling=sampling,
    )


def trl_loss(trainer, obj: PolicyObjective, data, rollout, accumulation_steps=1, steps_per_generation=None,
             num_items=None):
    """Stock TRL's _compute_loss with its per-token log-probs and entropies replaced by data's."""
    logp = data["logp"].clone().requires_grad_()
    entropy = data["entropy"].clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
    settings = dict(loss_type=obj.loss_type, epsilon_low=obj.epsilon, epsilon_high=obj.eps_high, beta=obj.beta,
                    importance_sampling_level=obj.importance_sampling_level,
                    top_entropy_quantile=obj.top_entropy_quantile,
                    off_policy_mask_threshold=obj.off_policy_mask_threshold,
                    use_vllm=obj.rollout_correction is not None,
                    vllm_importance_sampling_correction=obj.rollout_correction is not None,
                    entropy_coef=obj.entropy_coef, _entropy_bonus_enabled=obj.entropy_coef != 0,
                    use_adaptive_entropy=False, max_completion_length=obj.max_completion_length,
                    current_gradient_accumulation_steps=accumulation_steps)
    for name, value in settings.items():
        setattr(trainer, name, value)
    for name in ("delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                 "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        setattr(trainer.args, name, getattr(obj, name))
    trainer.args.steps_per_generation = steps_per_generation or accumulation_steps
    trainer._metrics["train"].clear()
    mask = data["mask"]
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                  advantages=data["adv"], old_per_token_logps=data["old"], ref_per_token_logps=data["ref"],
                  sampling_per_token_logps=data["sampling"],
                  num_items_in_batch=torch.tensor(float(mask.sum() if num_items is None else num_items),
                                                  dtype=torch.float64))
    if rollout is not None:
        inputs["importance_sampling_ratio"] = rollout
    loss = trainer._compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(obj, data, **kw):
    logp = data["logp"].clone().requires_grad_()
    entropy = data["entropy"].clone().requires_grad_()
    loss, metrics = policy_loss(obj, logp, entropy, data["adv"], data["mask"], data["old"],
                                data["ref"] if obj.beta else None, data["sampling"], **kw)
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return loss.detach(), grads, metrics


def assert_same(trainer, obj, data, **kw):
    rollout = None
    if obj.rollout_correction is not None:
        rollout, _ = rollout_ratio(data["old"], data["sampling"], data["mask"], obj.rollout_correction,
                                   obj.rollout_clip_min, obj.rollout_clip_max)
    want_loss, want_grads, want_metrics = trl_loss(trainer, obj, data, rollout, **kw)
    got_loss, got_grads, got_metrics = ours(obj, data, **{
        "accumulation_steps": kw.get("accumulation_steps", 1), "steps_per_generation": kw.get("steps_per_generation"),
        "num_items_in_batch": kw.get("num_items")})
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-9)
    for got, want in zip(got_grads, want_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    for name, value in want_metrics.items():
        if name == "entropy_coef":
            continue
        assert name in got_metrics, f"{name} not returned"
        torch.testing.assert_close(float(got_metrics[name]), float(value), rtol=1e-6, atol=1e-9, msg=name)


# TRL's torch.where(adv > 0, 1.0, 1.05) rounds the temperatures to float32 (ours keep the float64 1.05, the
# paper's value: tests/test_objective_formulas.py); one that float32 holds exactly compares the formulas.
SAPO_TEMPERATURE_NEG = 1.125

CASES = [(loss_type, level, mode) for loss_type, level, mode in itertools.product(LOSS_TYPES, ("token", "sequence"),
                                                                                  MODES)
         if not (loss_type == "vespo" and mode not in (None, "token_truncate", "token_mask"))]


@pytest.mark.parametrize("loss_type,level,mode", CASES)
def test_every_loss_type_level_and_correction_equals_trl(stock, loss_type, level, mode):
    obj = PolicyObjective(loss_type=loss_type, importance_sampling_level=level, rollout_correction=mode,
                          epsilon_high=5.0 if loss_type == "cispo" else 0.28, beta=0.04, max_completion_length=T,
                          rollout_clip_min=0.5 if mode else None, rollout_clip_max=2.0,
                          sapo_temperature_neg=SAPO_TEMPERATURE_NEG)
    assert_same(stock, obj, batch(zlib.crc32(f"{loss_type}-{level}-{mode}".encode()) % 1000))


@pytest.mark.parametrize("option", ["delta", "top_entropy", "off_policy", "entropy_bonus", "no_bias_correction",
                                    "per_token_adv"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "sapo", "cispo"])
def test_each_option_equals_trl(stock, loss_type, option):
    kw = dict(loss_type=loss_type, beta=0.04, epsilon_high=0.28, sapo_temperature_neg=SAPO_TEMPERATURE_NEG)
    kw.update({"delta": dict(delta=1.3), "top_entropy": dict(top_entropy_quantile=0.4),
               "off_policy": dict(off_policy_mask_threshold=0.05), "entropy_bonus": dict(entropy_coef=0.01),
               "no_bias_correction": dict(use_bias_correction_kl=False), "per_token_adv": {}}[option])
    assert_same(stock, PolicyObjective(**kw), batch(7, per_token_adv=option == "per_token_adv"))


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo", "grpo"])
def test_micro_batch_normalizers_equal_trl(stock, loss_type):
    obj = PolicyObjective(loss_type=loss_type, max_completion_length=T)
    assert_same(stock, obj, batch(11), accumulation_steps=4, steps_per_generation=4, num_items=123)
    assert_same(stock, obj, batch(12), accumulation_steps=2, steps_per_generation=4, num_items=77)


def test_rollout_ratio_is_the_product_of_token_ratios_and_its_bounds():
    data = batch(3)
    old, sampling, mask = data["old"], data["sampling"], data["mask"]
    token = torch.exp(torch.nan_to_num((old - sampling) * mask, nan=0.0))
    ratio, metrics = rollout_ratio(old, sampling, mask, "sequence_truncate", None, 1.5)
    torch.testing.assert_close(ratio, token.prod(-1, keepdim=True).clamp(max=1.5))
    ratio, _ = rollout_ratio(old, sampling, mask, "token_mask", 0.9, 1.1)
    assert ((ratio == 0) == ((token < 0.9) | (token > 1.1))).all() and ratio[2, 1] == 1
    assert float(metrics["sampling/importance_sampling_ratio/max"]) <= 1.5


@pytest.mark.parametrize("bad,match", [(dict(loss_type="ppo"), "loss_type"), (dict(epsilon=1.5), "epsilon"),
                                       (dict(importance_sampling_level="seq"), "importance_sampling_level"),
                                       (dict(rollout_correction="tis"), "rollout_correction"),
                                       (dict(loss_type="dr_grpo"), "max_completion_length"),
                                       (dict(loss_type="vespo", rollout_correction="sequence_mask"),
                                        "rollout_correction"),
                                       (dict(rollout_correction="token_truncate", rollout_clip_max=None),
                                        "rollout_clip_max")])
def test_bad_objectives_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        PolicyObjective(**bad)


def test_rollout_correction_needs_the_engines_log_probs():
    data = batch(1)
    with pytest.raises(ValueError, match="sampling_logp_BT"):
        policy_loss(PolicyObjective(rollout_correction="token_truncate"), data["logp"], data["entropy"], data["adv"],
                    data["mask"])


@pytest.mark.parametrize("loss_type,level,mode", CASES[::3])
@pytest.mark.parametrize("extra", [dict(beta=0.0), dict(beta=0.04, dual_clip_c=3.0)])
def test_metric_names_are_the_keys_policy_loss_returns(loss_type, level, mode, extra):
    obj = PolicyObjective(loss_type=loss_type, importance_sampling_level=level, rollout_correction=mode,
                          max_completion_length=T, rollout_clip_min=0.5 if mode else None, **extra)
    _, _, metrics = ours(obj, batch(5))
    assert tuple(sorted(metrics)) == metric_names(obj)
