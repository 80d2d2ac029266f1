"""GXPO and SFPO inside TRL's GRPOTrainer (gxpo_kernels.trl), on CPU with the tiny model: GRPO mode is
stock TRL, GXPO mode makes 3 closure passes per active step and lands where the rule lands when driven by
hand with TRL's loss on the same batch, micro-batches give the whole batch's gradient, and a resume equals
an uninterrupted run."""

import copy

import pytest
import torch
from helpers import rel_err

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gxpo_kernels import GXPO  # noqa: E402
from gxpo_kernels.loss.objectives import LOSS_TYPES  # noqa: E402
from gxpo_kernels.trl import FUSED_LOSS_OFF, GXPOConfig, GXPOTrainer  # noqa: E402
from trainer.models import tiny_random_model, tiny_tokenizer  # noqa: E402

COMMON = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-3,
              use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, bf16=False, optim="adamw_torch",
              lr_scheduler_type="constant")
PROMPTS = Dataset.from_list([{"prompt": f"{i} + {i} ="} for i in range(8)])


def reward(completions, **_):
    return [float(c.count("a") + c.count("1") + c.count(" ")) for c in completions]


def make(cls, config_cls, tmp_path, steps=1, **kw):
    tok = tiny_tokenizer()
    args = config_cls(output_dir=str(tmp_path / "out"), max_steps=steps, **{**COMMON, **kw})
    return cls(model=tiny_random_model(tok, seed=0), reward_funcs=reward, args=args, train_dataset=PROMPTS,
               processing_class=tok)


def params(trainer):
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def test_grpo_mode_is_stock_trl(tmp_path):
    stock = make(GRPOTrainer, GRPOConfig, tmp_path / "a")
    stock.train()
    ours = make(GXPOTrainer, GXPOConfig, tmp_path / "b", update_rule="grpo")
    ours.train()
    assert ours.rule is None
    moved = (params(stock) - params(make(GRPOTrainer, GRPOConfig, tmp_path / "c"))).abs().max()
    assert moved > 0  # the step did something
    torch.testing.assert_close(params(ours), params(stock), rtol=0, atol=1e-6)


def test_gxpo_mode_matches_the_rule_driven_by_hand(tmp_path, monkeypatch):
    ours = make(GXPOTrainer, GXPOConfig, tmp_path / "a", update_rule="gxpo", rule_kwargs={"tau": 100.0},
                max_grad_norm=1.0)
    start = copy.deepcopy(ours.model)
    batches, calls = [], []
    closure_of = ours._closure

    def spy(model, inputs):
        batches.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
        closure = closure_of(model, inputs)
        return lambda: calls.append(1) or closure()

    monkeypatch.setattr(ours, "_closure", spy)
    ours.train()
    assert ours.rule.last_stats["active"] == 1.0 and len(calls) == 3 and ours.rule.backward_passes == 3

    # by hand: the same batch, TRL's loss (a stock trainer's compute_loss), GXPO over a stock AdamW
    loss_of = make(GRPOTrainer, GRPOConfig, tmp_path / "b")
    loss_of.current_gradient_accumulation_steps = 1  # set by TRL's training loop, which this one never runs
    loss_of.model.train()
    model = start
    model.train()
    base = torch.optim.AdamW(model.parameters(), lr=COMMON["learning_rate"], weight_decay=0.0)
    rule = GXPO(list(model.parameters()), base=base, tau=100.0, max_grad_norm=1.0)

    def closure():
        loss = loss_of.compute_loss(model, batches[0])
        loss.backward()
        return loss.detach(), {"entropy_mean": loss_of._metrics["train"]["entropy"][-1]}

    rule.step(closure)
    by_hand = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (by_hand - params(loss_of)).abs().max() > 1e-4  # the step moved the parameters
    torch.testing.assert_close(params(ours), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_micro_batches_give_the_whole_batch_step(tmp_path, loss_type):
    runs = []
    for m in (1, 3):  # built and trained one after the other: a trainer seeds the global RNG when built
        runs.append(make(GXPOTrainer, GXPOConfig, tmp_path / f"m{m}", update_rule="sfpo", rule_micro_batches=m,
                         loss_type=loss_type, rule_kwargs={"tau": 100.0}))
        runs[-1].train()
    assert runs[0].rule.last_stats["active"] == 1.0
    torch.testing.assert_close(params(runs[1]), params(runs[0]), rtol=0, atol=1e-6)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole = make(GXPOTrainer, GXPOConfig, tmp_path / "whole", steps=3, update_rule="gxpo",
                 rule_kwargs={"tau": 100.0})
    whole.train()
    first = make(GXPOTrainer, GXPOConfig, tmp_path / "cut", steps=3, update_rule="gxpo", rule_kwargs={"tau": 100.0},
                 save_strategy="steps", save_steps=2)
    first.train()
    resumed = make(GXPOTrainer, GXPOConfig, tmp_path / "cut", steps=3, update_rule="gxpo",
                   rule_kwargs={"tau": 100.0}, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert resumed.rule.steps == whole.rule.steps == 3
    assert resumed.rule.gate.state_dict() == whole.rule.gate.state_dict()
    torch.testing.assert_close(params(resumed), params(whole), rtol=0, atol=1e-6)


def test_steps_per_generation_makes_each_slice_a_rule_step_and_one_gate_observation(tmp_path, monkeypatch):
    """steps_per_generation = 2: one generation batch (2 prompts x 4 completions) trained as TRL's two slices of it
    (disjoint, covering it), each one GXPO step (3 passes); the gate observes once, after the second, the token
    mean of the two corrective passes' entropies."""
    from gxpo_kernels.optim.gate import ZScoreGate

    trainer = make(GXPOTrainer, GXPOConfig, tmp_path, steps=2, update_rule="gxpo", steps_per_generation=2,
                   rule_kwargs={"tau": 100.0})
    generated, slices, observed = [], [], []
    generate, closure_of, observe = trainer._generate_and_score_completions, trainer._closure, ZScoreGate.observe
    monkeypatch.setattr(trainer, "_generate_and_score_completions", lambda batch: generated.append(generate(batch))
                        or generated[-1])

    def spy(model, inputs):
        calls = []
        slices.append((inputs, calls))
        closure = closure_of(model, inputs)
        return lambda: (out := closure(), calls.append(out[1]))[0]

    monkeypatch.setattr(trainer, "_closure", spy)
    monkeypatch.setattr(ZScoreGate, "observe", lambda gate, h: observed.append(h) or observe(gate, h))
    trainer.train()
    assert len(generated) == 1 and len(slices) == 2 and [len(calls) for _, calls in slices] == [3, 3]
    assert trainer.rule.steps == 2 and trainer.rule.backward_passes == 6 and trainer.rule.gate_steps == 1

    def rows(batch):
        return sorted(tuple(torch.cat([p, c]).tolist()) for p, c in zip(batch["prompt_ids"], batch["completion_ids"],
                                                                         strict=True))

    assert [len(rows(inputs)) for inputs, _ in slices] == [4, 4]
    assert sorted(rows(slices[0][0]) + rows(slices[1][0])) == rows(generated[0])
    corrective = [calls[-1] for _, calls in slices]
    tokens = sum(m["entropy_tokens"] for m in corrective)
    assert [m["entropy_tokens"] for m in corrective] == [float(i["completion_mask"].sum()) for i, _ in slices]
    assert observed == [pytest.approx(sum(m["entropy_mean"] * m["entropy_tokens"] for m in corrective) / tokens,
                                      rel=1e-12)]
    assert trainer.rule.last_stats["gate_stat"] == observed[0]


FUSED_CASES = [dict(loss_type=t) for t in LOSS_TYPES] + [
    dict(loss_type="grpo", importance_sampling_level="sequence"), dict(loss_type="luspo", importance_sampling_level=
                                                                       "sequence"),
    dict(loss_type="dapo", delta=1.02), dict(loss_type="dapo", entropy_coef=0.01),
    dict(loss_type="bnpo", top_entropy_quantile=0.5), dict(loss_type="dapo", off_policy_mask_threshold=0.01),
    dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0),
    dict(loss_type="cispo", epsilon_high=1.02)]


@pytest.mark.parametrize("options", FUSED_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_loss_steps_as_stock_trl(tmp_path, options):
    """TRL's loss through our kernels (the vocabulary primitive fused with the LM head, then the objective on
    its vectors) in place of TRL's: the same parameters after two steps and TRL's metrics, for every loss type
    and option; and the same gradient and metrics on a batch whose old log-probs are perturbed (TRL's loop is
    on-policy here, ratio 1), so that the ratio, the clips, the masks and the KL term are live."""
    kw = dict(steps=2, epsilon=0.05, max_grad_norm=1.0, **options)
    loss_type = options["loss_type"]
    stock = make(GRPOTrainer, GRPOConfig, tmp_path / "a", **kw)
    stock.train()
    fused = make(GXPOTrainer, GXPOConfig, tmp_path / "b", update_rule="grpo", fused_loss=True, **kw)
    batches = []
    compute = fused._compute_loss
    fused._compute_loss = lambda model, inputs: batches.append(copy.copy(inputs)) or compute(model, inputs)
    fused.train()
    # AdamW's first steps divide by sqrt(v) ~ |g|: a 1e-9 gradient difference becomes ~1e-6 on a few weights (an
    # entropy bonus puts a small gradient on every logit: ~1e-5); the gradient itself is compared below
    torch.testing.assert_close(params(fused), params(stock), rtol=0, atol=3e-5 if "entropy_coef" in options else 1e-5)
    logged = {k for h in stock.state.log_history for k in h} - {"loss", "grad_norm", "learning_rate", "epoch",
                                                                 "step_time", "train_runtime", "train_loss"}
    for key in sorted(k for k in logged if not k.startswith(("completions/", "rewards/", "reward", "frac_", "num_",
                                                             "train_", "total_flos", "step", "epoch"))):
        theirs, ours = [h[key] for h in stock.state.log_history if key in h], \
            [h[key] for h in fused.state.log_history if key in h]
        assert len(ours) == len(theirs) and ours == pytest.approx(theirs, abs=1e-6), key

    batch = dict(batches[-1])
    noise = torch.randn(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(0))
    logps = fused._sampling_logps(fused.model, batch)
    batch["old_per_token_logps"], batch["ref_per_token_logps"] = logps + 0.2 * noise, logps - 0.1 * noise.abs()
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])  # the tiny model's groups may all tie
    grads, metrics = [], []
    model = fused.model  # not a deep copy: TRL's fused LM head patches forward with a closure over the original
    for trainer in (stock, fused):
        model.zero_grad(set_to_none=True)
        trainer.current_gradient_accumulation_steps = 1
        trainer.beta, trainer.args.beta, trainer.args.use_bias_correction_kl = 0.3, 0.3, loss_type != "grpo"
        compute_loss = GRPOTrainer._compute_loss.__get__(trainer) if trainer is stock else compute
        compute_loss(model, batch).backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in model.parameters()]))
        metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items() if k != "entropy_coef"})
        trainer._metrics["train"].clear()
    assert rel_err(grads[1], grads[0]) < 1e-5 and grads[0].abs().max() > 0
    if loss_type in ("grpo", "dapo") and "delta" not in options:
        assert metrics[0]["clip_ratio/low_mean"] > 0 and metrics[0]["clip_ratio/high_mean"] > 0
    assert set(metrics[0]) <= set(metrics[1]) and metrics[1] == pytest.approx(
        {k: metrics[1][k] for k in metrics[0]} | metrics[0], abs=1e-6)


def test_fused_loss_under_gxpo_matches_trls_loss(tmp_path):
    runs = []
    for fused in (False, True):  # built and trained one after the other: a trainer seeds the global RNG when built
        # the raw-gradient ratio: AdamW's first directions m / (sqrt(v) + eps) are nearly sign(g), and the update
        # space's r = d1 / d0 would turn the two losses' 1e-7 rounding into a flipped coordinate here and there
        runs.append(make(GXPOTrainer, GXPOConfig, tmp_path / str(fused), update_rule="gxpo", fused_loss=fused,
                         rule_preset="final", rule_kwargs={"tau": 100.0}, rule_micro_batches=2, loss_type="bnpo"))
        runs[-1].train()
    assert runs[1].rule.last_stats["active"] == 1.0 and runs[1].rule.backward_passes == 3
    logged = [h["grad_norm"] for h in runs[1].state.log_history if "grad_norm" in h]
    assert logged == [pytest.approx(runs[1].rule.last_grad_norm)] and logged[0] > 0  # the rule's pre-clip norm
    torch.testing.assert_close(params(runs[1]), params(runs[0]), rtol=0, atol=1e-5)


def test_fused_loss_takes_every_loss_option():
    """FUSED_LOSS_OFF is empty: every GRPOConfig loss option runs through the fused path; what the objective
    cannot take names the field."""
    assert FUSED_LOSS_OFF == ()
    base = dict(output_dir="x", fused_loss=True, use_cpu=True, report_to=[])
    for options in FUSED_CASES + [dict(beta=0.1), dict(importance_sampling_level="sequence", loss_type="cispo")]:
        GXPOConfig(**base, **options)
    with pytest.raises(ValueError, match="epsilon"):
        GXPOConfig(**base, epsilon=1.5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        GXPOConfig(output_dir="x", update_rule="gxpo", gradient_accumulation_steps=2, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="update_rule must be one of"):
        GXPOConfig(output_dir="x", update_rule="ppo", use_cpu=True, report_to=[])


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_fused_loss_rollout_correction_equals_trl(tmp_path, mode):
    """vLLM's importance-sampling correction through the fused path: on a batch carrying the engine's log-probs
    and TRL's importance_sampling_ratio (as _generate_and_score_completions leaves them with use_vllm), the same
    gradient and metrics as stock TRL's loss. (No vLLM here: the two trainers are switched to it after
    construction.)"""
    kw = dict(steps=1, loss_type="dapo", epsilon=0.05)
    stock = make(GRPOTrainer, GRPOConfig, tmp_path / "a", **kw)
    fused = make(GXPOTrainer, GXPOConfig, tmp_path / "b", update_rule="grpo", fused_loss=True, **kw)
    batches = []
    compute = fused._compute_loss
    fused._compute_loss = lambda model, inputs: batches.append(copy.copy(inputs)) or compute(model, inputs)
    fused.train()
    batch = dict(batches[-1])
    g = torch.Generator().manual_seed(1)
    logps = fused._sampling_logps(fused.model, batch)
    batch["old_per_token_logps"] = logps + 0.1 * torch.randn(logps.shape, generator=g)
    batch["sampling_per_token_logps"] = batch["old_per_token_logps"] + 0.05 * torch.randn(logps.shape, generator=g)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.7, -1.2])
    from gxpo_kernels.loss.objectives import rollout_ratio

    ratio, _ = rollout_ratio(batch["old_per_token_logps"], batch["sampling_per_token_logps"], batch["completion_mask"],
                             mode, 0.9, 1.1)
    batch["importance_sampling_ratio"] = ratio
    bound = (ratio == 0) if mode.endswith("mask") else (ratio == 0.9) | (ratio == 1.1)
    assert bound.any() and ((ratio > 0.9) & (ratio < 1.1) & (ratio != 1)).any()  # the bounds and the weights live
    grads, metrics = [], []
    for trainer in (stock, fused):
        trainer.use_vllm = trainer.args.use_vllm = True
        trainer.vllm_importance_sampling_correction = trainer.args.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode = trainer.args.vllm_importance_sampling_mode = mode
        trainer.args.vllm_importance_sampling_clip_min, trainer.args.vllm_importance_sampling_clip_max = 0.9, 1.1
        trainer.current_gradient_accumulation_steps = 1
        trainer._metrics["train"].clear()
        fused.model.zero_grad(set_to_none=True)
        compute_loss = GRPOTrainer._compute_loss.__get__(trainer) if trainer is stock else compute
        compute_loss(fused.model, batch).backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                for p in fused.model.parameters()]))
        metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    assert rel_err(grads[1], grads[0]) < 1e-5 and grads[0].abs().max() > 0
    assert set(metrics[0]) <= set(metrics[1])
    assert {k: metrics[1][k] for k in metrics[0]} == pytest.approx(metrics[0], abs=1e-6)
