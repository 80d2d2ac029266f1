"""Policy objectives as functions of per-token [B, T] vectors: the log-probs of the sampled tokens and their
entropies (both differentiable, from the vocabulary primitive or any other source), the advantages, the masks
and the rollout's log-probs. One home for TRL 1.16's eight loss types with their normalizers, GSPO's
sequence-level ratio, two-sided clipping (delta), dual clipping, the k3 KL with TRL's bias correction, the
entropy bonus, top-entropy-quantile masking, the off-policy sequence mask and the rollout-mismatch correction
(TRL's four vLLM importance-sampling modes; verl's TIS is token_truncate with clip_max, IcePop token_mask with
both bounds). Metrics are 0-d tensors named as TRL logs them (single process: the local means)."""

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the PPO-clip surrogate
IS_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTIONS = (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# A micro-batch of these weighs its share of the batch's sequences (their normalizers are per sequence); of the
# others, its share of tokens (bnpo: local token means; dapo / cispo / vespo: the batch's token count).
PER_SEQUENCE_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
_VESPO_LOG_FLOOR = math.log(1e-8)


@dataclass(frozen=True)
class PolicyObjective:
    """What the loss optimizes, with TRL 1.16's GRPOConfig names and defaults where it has them."""

    loss_type: str = "dapo"
    epsilon: float = 0.2  # the ratio's lower clip 1 - epsilon
    epsilon_high: float | None = None  # upper clip 1 + epsilon_high (None: epsilon); cispo: the ratio's cap itself
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta (INTELLECT-2)
    dual_clip_c: float | None = None  # verl's dual clip: a negative advantage's loss capped at -c A
    importance_sampling_level: str = "token"  # | "sequence": GSPO's exp(mean_t log ratio)
    beta: float = 0.0  # k3 KL to the reference policy
    use_bias_correction_kl: bool = True  # the KL weighted by the ratio to the old policy (TRL's default)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0  # the policy term on the top quantile of tokens by entropy (1: all)
    off_policy_mask_threshold: float | None = None  # drop negative-advantage sequences this far off-policy (OPSM)
    entropy_coef: float = 0.0  # loss - entropy_coef * mean entropy
    rollout_correction: str | None = None  # the rollout engine's mismatch correction (ROLLOUT_CORRECTIONS)
    rollout_clip_min: float | None = None
    rollout_clip_max: float | None = 3.0
    max_completion_length: int | None = None  # dr_grpo's constant normalizer

    def __post_init__(self):
        for name, ok, want in objective_checks(self):
            if not ok:
                raise ValueError(f"PolicyObjective.{name} = {getattr(self, name)!r}: must be {want}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def reads_entropy(self) -> bool:
        """Whether the loss (not only a metric) depends on the per-token entropy."""
        return self.entropy_coef != 0 or self.top_entropy_quantile < 1


def objective_checks(obj) -> list:
    """(field, holds, what it must be) for each of PolicyObjective's fields; obj is anything with its fields (the
    trainer's [objective] section too)."""
    return [
        ("loss_type", obj.loss_type in LOSS_TYPES, f"one of {LOSS_TYPES}"),
        ("epsilon", 0 < obj.epsilon < 1, "in (0, 1)"),
        ("epsilon_high", obj.epsilon_high is None or obj.epsilon_high > 0, "> 0 or None"),
        ("delta", obj.delta is None or obj.delta > 1, "> 1 or None"),
        ("dual_clip_c", obj.dual_clip_c is None or obj.dual_clip_c > 1, "> 1 or None"),
        ("importance_sampling_level", obj.importance_sampling_level in IS_LEVELS, f"one of {IS_LEVELS}"),
        ("beta", obj.beta >= 0, ">= 0"),
        ("top_entropy_quantile", 0 <= obj.top_entropy_quantile <= 1, "in [0, 1]"),
        ("off_policy_mask_threshold", obj.off_policy_mask_threshold is None or obj.off_policy_mask_threshold > 0,
         "> 0 or None"),
        ("rollout_correction", obj.rollout_correction in ROLLOUT_CORRECTIONS, f"one of {ROLLOUT_CORRECTIONS}"),
        ("rollout_clip_max", obj.rollout_clip_min is None or obj.rollout_clip_max is None
         or obj.rollout_clip_min < obj.rollout_clip_max, "> rollout_clip_min"),
        ("rollout_clip_max", not (obj.rollout_correction or "").endswith("truncate")
         or obj.rollout_clip_min is not None or obj.rollout_clip_max is not None,
         "set (or rollout_clip_min) for a truncate correction"),
        ("max_completion_length", obj.loss_type != "dr_grpo" or (obj.max_completion_length or 0) > 0,
         "> 0 for loss_type 'dr_grpo'"),
        ("rollout_correction", obj.loss_type != "vespo" or obj.rollout_correction in (None, "token_truncate",
                                                                                   "token_mask"),
         "None, 'token_truncate' or 'token_mask' for vespo (it folds the token ratios into its weight)"),
    ]


def metric_names(obj: PolicyObjective) -> tuple:
    """The keys of policy_loss's metrics under obj, sorted (the same on every process, whatever its batch)."""
    names = {"policy_loss", "entropy"}
    if obj.rollout_correction is not None:
        names |= {f"sampling/sampling_logp_difference/{s}" for s in ("mean", "max")}
        names |= {f"sampling/importance_sampling_ratio/{s}" for s in ("min", "mean", "max")}
    if obj.loss_type == "vespo":
        names.add("vespo/phi_seq_mean")
    if obj.beta != 0:
        names.add("kl")
    if obj.loss_type == "cispo":
        names.add("cispo_clip_ratio")
    if obj.loss_type in CLIP_LOSS_TYPES:
        names |= {f"clip_ratio/{s}" for s in ("low_mean", "high_mean", "region_mean", "low_min", "high_max")}
        if obj.dual_clip_c is not None:
            names.add("clip_ratio/dual_mean")
    return tuple(sorted(names))


def adapted_entropy_coef(coef, entropy, target, delta, coef_min, coef_max) -> float:
    """Skywork-OR1's adaptive entropy control, one optimizer step of it as TRL 1.16 takes it: the coefficient
    moves by delta up when the token-mean entropy is at or below target, down otherwise, within [min, max]; the
    bonus then applies (at the new coefficient) only while the entropy stays at or below target."""
    return min(coef + delta, coef_max) if entropy <= target else max(coef - delta, coef_min)


def rollout_ratio(old_logp_BT, sampling_logp_BT, mask_BT, mode, clip_min=None, clip_max=3.0):
    """The rollout-mismatch weight pi_old / pi_rollout ([B, T] for token modes, [B, 1] for sequence modes, a
    product of the token ratios), truncated to [clip_min, clip_max] or zeroed outside it; a token the engine
    could not score (NaN) counts as ratio 1. No gradient. Returns (ratio, metrics)."""
    with torch.no_grad():
        diff_BT = torch.nan_to_num((old_logp_BT - sampling_logp_BT) * mask_BT, nan=0.0)
        sequence = mode.startswith("sequence")
        ratio = torch.exp(diff_BT.sum(-1, keepdim=True) if sequence else diff_BT)
        if mode.endswith("truncate"):
            ratio = ratio.clamp(min=clip_min, max=clip_max)
        else:
            lo = -math.inf if clip_min is None else clip_min
            hi = math.inf if clip_max is None else clip_max
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        scored = mask_BT.bool() & ~torch.isnan(sampling_logp_BT)
        gap = (old_logp_BT - sampling_logp_BT).abs()[scored]
        shown = ratio.flatten() if sequence else ratio[mask_BT.bool()]
        metrics = {"sampling/sampling_logp_difference/mean": gap.mean(),
                   "sampling/sampling_logp_difference/max": gap.max() if gap.numel() else gap.sum(),
                   "sampling/importance_sampling_ratio/min": shown.min(),
                   "sampling/importance_sampling_ratio/mean": shown.mean(),
                   "sampling/importance_sampling_ratio/max": shown.max()}
    return ratio, metrics


def high_entropy_mask(entropy_BT, mask_BT, quantile, gather=None):
    """Tokens whose entropy is at least the (1 - top_entropy_quantile) quantile of the unmasked tokens' (of
    every process's, through gather)."""
    valid = entropy_BT.detach()[mask_BT.bool()].float()
    if gather is not None:
        valid = gather(valid)
    if valid.numel() == 0:
        return torch.zeros_like(mask_BT, dtype=torch.bool)
    threshold = torch.quantile(valid, 1 - quantile)
    return ((entropy_BT.detach() * mask_BT) >= threshold) & mask_BT.bool()


def off_policy_mask(adv_B1, logp_BT, behaviour_logp_BT, mask_BT, threshold):
    """DeepSeek-V3.2's sequence mask [B, 1]: keep a sequence unless its advantage is negative and its mean
    log(pi_behaviour / pi_theta) exceeds the threshold."""
    kl_BT = torch.nan_to_num(behaviour_logp_BT - logp_BT.detach(), nan=0.0)
    mean_kl_B1 = (kl_BT * mask_BT).sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1.0)
    return ((adv_B1 >= 0) | (mean_kl_B1 <= threshold)).to(mask_BT.dtype)


def vespo_weight(obj, adv_B1, log_ratio_BT, mask_BT, rollout_ratio_BT):
    """VESPO's sequence weight phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1), w the sequence's ratio times the
    rollout correction's token ratios; a constant of the gradient."""
    with torch.no_grad():
        log_w = (log_ratio_BT.clamp(-20.0, 20.0) * mask_BT).sum(-1, keepdim=True)
        if rollout_ratio_BT is not None:
            log_w = log_w + torch.log(rollout_ratio_BT).clamp(_VESPO_LOG_FLOOR, 20.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(_VESPO_LOG_FLOOR, 20.0)
        nonneg = adv_B1 >= 0
        k = _by_sign(nonneg, obj.vespo_k_pos, obj.vespo_k_neg, adv_B1)
        lam = _by_sign(nonneg, obj.vespo_lambda_pos, obj.vespo_lambda_neg, adv_B1).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _by_sign(where, if_true: float, if_false: float, like):
    """A per-element constant in like's dtype (torch.where of two floats would round them to float32)."""
    return torch.where(where, torch.tensor(if_true, dtype=like.dtype, device=like.device),
                       torch.tensor(if_false, dtype=like.dtype, device=like.device))


def _per_token_loss(obj, logp_BT, ratio, adv, log_ratio_BT, mask_BT, rollout_ratio_BT, metrics):
    """(the policy term per token ([B, T], or [B, 1] at sequence level), the ratio the clip metrics read, the
    dual clip's tokens or None)."""
    if obj.loss_type == "cispo":
        return -torch.clamp(ratio, max=obj.eps_high).detach() * adv * logp_BT, ratio, None
    if obj.loss_type == "sapo":
        tau = _by_sign(adv > 0, obj.sapo_temperature_pos, obj.sapo_temperature_neg, adv)
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, ratio, None
    if obj.loss_type == "vespo":
        phi_B1 = vespo_weight(obj, adv, log_ratio_BT, mask_BT, rollout_ratio_BT)
        metrics["vespo/phi_seq_mean"] = phi_B1.mean()
        return -phi_B1 * adv * logp_BT, ratio, None
    clipped = torch.clamp(ratio, 1 - obj.epsilon, 1 + obj.eps_high)
    if obj.delta is not None:
        ratio = torch.clamp(ratio, max=obj.delta)
    loss = -torch.min(ratio * adv, clipped * adv)
    if obj.dual_clip_c is None:
        return loss, ratio, None
    is_dual = (adv < 0) & (-obj.dual_clip_c * adv < loss)
    return torch.where(is_dual, -obj.dual_clip_c * adv, loss), ratio, is_dual


def _aggregate(obj, per_token_BT, mask_BT, num_items, accumulation_steps, steps_per_generation, num_processes):
    """The loss type's normalizer over one micro-batch (TRL's, training mode)."""
    if obj.loss_type in ("grpo", "sapo"):
        return ((per_token_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if obj.loss_type == "bnpo":
        return (per_token_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0) / accumulation_steps
    if obj.loss_type == "dr_grpo":
        return (per_token_BT * mask_BT).sum() / (per_token_BT.shape[0] * obj.max_completion_length) \
            / accumulation_steps
    if obj.loss_type == "luspo":
        return (per_token_BT * mask_BT).sum(-1).mean() / accumulation_steps
    total = mask_BT.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask_BT.dtype,
                                                                     device=mask_BT.device)
    normalizer = total.clamp(min=1.0) / num_processes * accumulation_steps / steps_per_generation
    return (per_token_BT * mask_BT).sum() / normalizer


def policy_loss(obj: PolicyObjective, logp_BT, entropy_BT, advantages, mask_BT, old_logp_BT=None, ref_logp_BT=None,
                sampling_logp_BT=None, num_items_in_batch=None, accumulation_steps=1, steps_per_generation=None,
                num_processes=1, rollout_weight=None, gather=None):
    """(loss, metrics) of one micro-batch. logp_BT / entropy_BT: the sampled tokens' log-probs and the entropies
    under the policy being trained (differentiable); advantages [B] or [B, T]; mask_BT 0/1; old_logp_BT the
    rollout policy's log-probs as the trainer scores them (None: on-policy, logp_BT detached); sampling_logp_BT
    the rollout engine's own log-probs (rollout correction and the off-policy mask; NaN where it could not
    score). num_items_in_batch: unmasked tokens of the whole generation batch over all processes (dapo, cispo,
    vespo; default this micro-batch's), split into steps_per_generation micro-batches (default
    accumulation_steps). rollout_weight: the rollout correction's ratio computed already (TRL's
    importance_sampling_ratio), used as it is; gather: all processes' values of a 1-d tensor (the entropy
    quantile over every process's tokens, as TRL takes it)."""
    _check_inputs(logp_BT, entropy_BT, advantages, mask_BT, old_logp_BT=old_logp_BT, ref_logp_BT=ref_logp_BT,
                  sampling_logp_BT=sampling_logp_BT)
    if obj.beta != 0 and ref_logp_BT is None:
        raise ValueError("beta > 0 needs ref_logp_BT, the reference policy's log-probs")
    if obj.rollout_correction is not None and rollout_weight is None and sampling_logp_BT is None:
        raise ValueError(f"rollout_correction={obj.rollout_correction!r} needs sampling_logp_BT, the rollout "
                         "engine's log-probs of the sampled tokens")
    mask_BT = mask_BT.to(logp_BT.dtype)
    adv = advantages.to(logp_BT.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    old_logp_BT = logp_BT.detach() if old_logp_BT is None else old_logp_BT
    steps_per_generation = accumulation_steps if steps_per_generation is None else steps_per_generation
    metrics = {}
    rollout_BT = rollout_weight if obj.rollout_correction is not None else None
    if obj.rollout_correction is not None and rollout_weight is None:
        rollout_BT, rollout_metrics = rollout_ratio(old_logp_BT, sampling_logp_BT, mask_BT, obj.rollout_correction,
                                                    obj.rollout_clip_min, obj.rollout_clip_max)
        metrics.update(rollout_metrics)
    entropy_mask_BT = None
    if obj.top_entropy_quantile < 1:
        entropy_mask_BT = high_entropy_mask(entropy_BT, mask_BT, obj.top_entropy_quantile, gather)

    log_ratio_BT = logp_BT - old_logp_BT
    if obj.importance_sampling_level == "sequence":
        log_weight = ((log_ratio_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_weight = log_ratio_BT
    ratio = torch.exp(log_weight)
    per_token, clip_ratio, dual = _per_token_loss(obj, logp_BT, ratio, adv, log_ratio_BT, mask_BT, rollout_BT,
                                                  metrics)

    if obj.off_policy_mask_threshold is not None:
        behaviour = old_logp_BT if sampling_logp_BT is None else sampling_logp_BT
        per_token = per_token * off_policy_mask(adv, logp_BT, behaviour, mask_BT, obj.off_policy_mask_threshold)
    if entropy_mask_BT is not None:
        per_token = per_token * entropy_mask_BT
    if rollout_BT is not None and obj.loss_type != "vespo":
        per_token = per_token * rollout_BT
    if obj.beta != 0:
        diff_BT = ref_logp_BT - logp_BT
        kl_BT = torch.exp(diff_BT) - diff_BT - 1
        if obj.use_bias_correction_kl:
            kl_BT = kl_BT * ratio
        per_token = per_token + obj.beta * kl_BT
        metrics["kl"] = _masked_mean(kl_BT.detach(), mask_BT)
    loss = _aggregate(obj, per_token, mask_BT, num_items_in_batch, accumulation_steps, steps_per_generation,
                      num_processes)

    # TRL's policy_loss: before the division by the accumulation steps, except where the normalizer holds them
    metrics["policy_loss"] = loss.detach() * (1 if obj.loss_type in ("dapo", "cispo", "vespo") else accumulation_steps)
    if obj.entropy_coef != 0:
        effective = mask_BT if entropy_mask_BT is None else mask_BT * entropy_mask_BT
        bonus = (entropy_BT * effective).sum() / effective.sum().clamp(min=1.0) / accumulation_steps
        loss = loss - obj.entropy_coef * bonus
    metrics["entropy"] = _masked_mean(entropy_BT.detach(), mask_BT)
    _clip_metrics(obj, metrics, clip_ratio.detach(), adv, mask_BT, dual)
    return loss, metrics


def _check_inputs(logp_BT, entropy_BT, advantages, mask_BT, **per_token):
    shape = tuple(logp_BT.shape)
    if logp_BT.dim() != 2:
        raise ValueError(f"logp_BT must be [B, T], got {shape}")
    for name, x in (("entropy_BT", entropy_BT), ("mask_BT", mask_BT), *per_token.items()):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have logp_BT's shape {shape}, got {tuple(x.shape)}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must be [B] = {shape[:1]} or [B, T] = {shape}, got {tuple(advantages.shape)}")
    on = (mask_BT != 0) if advantages.dim() == 2 else (mask_BT != 0).any(-1)
    if not torch.isfinite(advantages)[on].all():
        raise ValueError("advantages has NaN or inf at unmasked tokens; check the rewards (NaN rewards, or a "
                         "zero-variance group divided by std without an epsilon)")


def _masked_mean(x, mask_BT):
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


def _clip_metrics(obj, metrics, ratio, adv, mask_BT, dual):
    if obj.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean(((ratio > obj.eps_high) & (adv > 0)).to(mask_BT.dtype), mask_BT)
    if obj.loss_type not in CLIP_LOSS_TYPES:
        return
    low = ((ratio < 1 - obj.epsilon) & (adv < 0)).to(mask_BT.dtype)
    high = ((ratio > 1 + obj.eps_high) & (adv > 0)).to(mask_BT.dtype)
    seq_mean = (lambda x: x.squeeze(1)) if low.shape[1] == 1 else (lambda x: (x * mask_BT).sum(-1) / mask_BT.sum(-1))
    metrics.update({"clip_ratio/low_mean": _masked_mean(low, mask_BT),
                    "clip_ratio/high_mean": _masked_mean(high, mask_BT),
                    "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask_BT),
                    "clip_ratio/low_min": seq_mean(low).nan_to_num(nan=math.inf).min(),
                    "clip_ratio/high_max": seq_mean(high).nan_to_num(nan=-math.inf).max()})
    if dual is not None:
        metrics["clip_ratio/dual_mean"] = _masked_mean(dual.to(mask_BT.dtype), mask_BT)
