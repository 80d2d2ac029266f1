"""One training step's update: the loss closure over the rollout batch (fused LM-head GRPO loss,
micro-batched, normalized over all ranks) and the update rule (GRPO, SFPO or GXPO)
that calls it; with PPO mini-batches ([update] mini_batches), one closure and one rule step per mini-batch of
whole prompt groups, read back as one update (MiniBatchClosures, combine_rule_stats)."""

import dataclasses
import math
import time

import torch

from gxpo_kernels import FlatAdamW, Muon
from gxpo_kernels.loss.objectives import PER_SEQUENCE_LOSSES, high_entropy_mask, metric_names, policy_loss
from gxpo_kernels.optim.lookahead import ENTROPY_TOKENS

from .distributed import SINGLE, Dist
from .packing import pack, padding_fractions


def make_update_rule(cfg, params):
    """The configured rule (cfg.algo's section, through gxpo_kernels.optim.RULES) over the base optimizer. params:
    the parameters, or (name, parameter) pairs (Muon needs the names: embeddings and the LM head take AdamW)."""
    base_kwargs = {"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay}
    if cfg.optim.name == "muon":
        base, base_kwargs = Muon, {**base_kwargs, **cfg.muon.kwargs()}
    else:
        params = [p[1] if isinstance(p, tuple) else p for p in params]
        base = FlatAdamW if cfg.optim.name == "flat_adamw" else torch.optim.AdamW
    return cfg.rule.build(params, base, max_grad_norm=cfg.optim.max_grad_norm, allow_bf16_params=cfg.bf16_params,
                          **base_kwargs)


def gate_reads_batch_entropy(cfg) -> bool:
    """The update rule's gate observes the corrective pass's entropy over the whole batch."""
    return cfg.rule.reads_batch_entropy


def policy_objective(cfg):
    """The [objective] section's PolicyObjective when loss.objective = "policy", else None (the GRPO kernels)."""
    return cfg.objective.to_objective() if cfg.loss.objective == "policy" else None


def kl_beta(cfg) -> float:
    """The KL coefficient of the configured loss (a reference model is loaded when it is > 0)."""
    return cfg.objective.beta if cfg.loss.objective == "policy" else cfg.loss.beta


def skips_zero_advantages(cfg) -> bool:
    """Completions whose advantage is zero leave every pass when that is exact: no KL term (their loss and
    gradient are then identically 0; every objective's policy term is a multiple of the advantage), no entropy
    term and no entropy quantile (both read every completion's tokens), and no gate that reads the batch's
    entropy (which would lose them)."""
    objective = cfg.objective
    entropy_free = cfg.loss.objective != "policy" or (
        objective.entropy_coef == 0 and not cfg.loss.use_adaptive_entropy and objective.top_entropy_quantile == 1)
    return cfg.loss.skip_zero_advantage and kl_beta(cfg) == 0 and entropy_free and not gate_reads_batch_entropy(cfg)


METRIC_KEYS = ("clip_frac_high", "clip_frac_low", "entropy_mean", "ratio_mean")  # grpo_loss's, as the closure calls it
# policy_loss's metrics under the closure's names (the rest keep TRL's)
RENAMED_METRICS = {"entropy": "entropy_mean", "kl": "kl_mean"}


def metric_keys(cfg, with_ref: bool) -> list:
    """The closure's loss metrics, sorted: the same keys on every rank, whatever its batch."""
    objective = policy_objective(cfg)
    if objective is None:
        return sorted(METRIC_KEYS + (("kl_mean",) if with_ref else ()))
    return sorted(RENAMED_METRICS.get(k, k) for k in metric_names(objective))


def _extreme(key: str):
    """max or min for a metric that is a maximum or minimum (TRL's /max, _min, ...), else None (a mean)."""
    return max if key.endswith(("/max", "_max")) else min if key.endswith(("/min", "_min")) else None


class NonFiniteLoss(RuntimeError):
    """A pass's loss over the batch was not finite (a diverged policy, or non-finite inputs)."""


class LossClosure:
    """closure() -> (loss, metrics) on a fixed batch. The first call is on-policy (rollouts came from
    the current weights) and its per-token log-probs become old_logp for every later call, so no extra
    forward is needed. Each micro-batch's loss is weighted by its share of the global batch (tokens for
    token-mean, sequences otherwise, counted over all ranks), so the gradient equals the one-batch
    gradient for every loss_agg mode and any rank layout; loss and metrics are global. pass_times
    collects each call's wall-clock. When skips_zero_advantages(cfg), completions with zero advantage are
    left out of every pass (the normalizers still count them, so loss and gradient are unchanged; the
    metrics are then means over the completions that train); when every completion on every rank is
    left out, no forward or backward runs and the gradients are zeros."""

    def __init__(self, runner, batch, advantages_B, cfg, ref_logp_BT=None, dist: Dist = SINGLE, entropy_coef=None):
        self.runner, self.batch, self.adv, self.cfg, self.ref, self.dist = runner, batch, advantages_B, cfg, \
            ref_logp_BT, dist
        self.objective = policy_objective(cfg)
        # the entropy bonus's coefficient this step (adaptive entropy control sets it; default [objective]'s)
        self.entropy_coef = self.objective.entropy_coef if entropy_coef is None and self.objective else entropy_coef
        self.entropy_sums = (0.0, 0.0)  # the last pass's (sum of entropy over completion tokens, tokens), this rank
        self.old_logp_BT = None
        self.pass_times = []
        self.last_metrics = {}
        B = batch.completion_ids.shape[0]
        self.total_tokens, self.total_seqs = dist.sum([batch.completion_mask.sum(), B])
        self.rows = self._trained_rows()
        self.trained_mask = torch.zeros_like(batch.completion_mask)
        self.trained_mask[self.rows] = batch.completion_mask[self.rows]
        self.trained_tokens = dist.sum([self.trained_mask.sum()])[0]
        self.micro_batches = self._plan()
        self.stats["pack/skipped_token_frac"] = 1 - self.trained_tokens / max(self.total_tokens, 1.0)

    def _trained_rows(self) -> list:
        B = self.batch.completion_ids.shape[0]
        if not skips_zero_advantages(self.cfg):
            return list(range(B))
        adv = self.adv if self.adv.dim() == 2 else self.adv[:, None].expand_as(self.batch.completion_mask)
        nonzero = ((adv != 0) & self.batch.completion_mask.bool().to(adv.device)).any(1)
        return nonzero.nonzero().squeeze(1).tolist()

    def _plan(self) -> list:
        """(rows, packed micro-batch or None) per micro-batch, the same count on every rank: a rank with
        fewer runs zero-loss passes (rows None) so the FSDP2 collectives of every forward/backward match."""
        B, loss_cfg = self.batch.completion_ids.shape[0], self.cfg.loss
        if loss_cfg.pack:
            plan = [(m.rows, m) for m in pack(self.batch, loss_cfg.max_tokens_per_micro_batch, self.rows)]
        elif len(self.rows) == B:
            size = loss_cfg.micro_batch_size or B
            plan = [(slice(i, min(i + size, B)), None) for i in range(0, B, size)]
        else:
            size, device = loss_cfg.micro_batch_size or B, self.batch.completion_ids.device
            plan = [(torch.tensor(self.rows[i:i + size], device=device), None)
                    for i in range(0, len(self.rows), size)]
        self.stats = padding_fractions(self.batch, [m for _, m in plan] if loss_cfg.pack else None, self.rows)
        most, fewest = self.dist.max(len(plan)), -self.dist.max(-len(plan))
        self.stats.update({"micro_batches_max": most, "micro_batches_min": fewest})
        return plan + [(None, None)] * (most - len(plan))

    def __call__(self):
        t0 = time.perf_counter()
        cfg, batch = self.cfg, self.batch
        max_len = cfg.loss.max_completion_len or cfg.rollout.max_new_tokens
        total_loss, sums, extremes = 0.0, {}, {}
        self.entropy_sums = (0.0, 0.0)
        logp_BT = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        if not self.micro_batches:  # every completion skipped on every rank: the gradient is zero
            for p in self.runner.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        for rows, packed in self.micro_batches:
            if rows is None:
                self.runner("zero_loss").backward()
                continue
            mask_mb = batch.completion_mask[rows]
            token_share = float(mask_mb.sum()) / max(self.total_tokens, 1.0)
            seq_share = mask_mb.shape[0] / self.total_seqs
            metric_share = float(mask_mb.sum()) / max(self.trained_tokens, 1.0)  # means over trained tokens
            if self.objective is not None:
                loss, metrics, logp_mb = self._objective_pass(rows, packed, token_share, seq_share)
                total_loss += loss
                logp_BT[rows] = logp_mb.to(logp_BT.dtype)
                for k, v in metrics.items():
                    if (pick := _extreme(k)) is not None:
                        extremes[k] = pick(extremes.get(k, v), v)
                    else:
                        sums[k] = sums.get(k, 0.0) + v * metric_share
                continue
            loss_kwargs = dict(
                old_logp_BT=None if self.old_logp_BT is None else self.old_logp_BT[rows],
                ref_logp_BT=None if self.ref is None else self.ref[rows], beta=cfg.loss.beta,
                eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, temperature=cfg.rollout.temperature,
                loss_agg=cfg.loss.loss_agg, max_completion_len=max_len, return_entropy=True,
                log_ratio_clamp=cfg.loss.log_ratio_clamp)
            if packed is None:
                loss, metrics = self.runner("token_loss", batch, rows, self.adv[rows], **loss_kwargs)
            else:
                loss, metrics = self.runner("packed_token_loss", batch, packed, self.adv[rows], **loss_kwargs)
            weight = token_share if cfg.loss.loss_agg == "token-mean" else seq_share
            (loss * (weight * self.dist.world)).backward()  # FSDP2 averages gradients over ranks
            total_loss += float(loss.detach()) * weight
            logp_BT[rows] = metrics.pop("logp_BT").detach().to(logp_BT.dtype)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * metric_share
        if self.old_logp_BT is None:
            self.old_logp_BT = logp_BT
        # the same keys on every rank, also on one whose completions were all skipped (it ran no loss)
        keys = metric_keys(cfg, self.ref is not None)
        means = [k for k in keys if _extreme(k) is None]
        assert set(sums) | set(extremes) <= set(keys), f"loss metrics {sorted(set(sums) - set(keys))} not declared"
        reduced = self.dist.sum([total_loss] + [sums.get(k, 0.0) for k in means])
        nan_if_untrained = (lambda v: v) if self.trained_tokens else (lambda v: float("nan"))  # nothing was scored
        self.last_metrics = {"loss": reduced[0], **{k: nan_if_untrained(v) for k, v in zip(means, reduced[1:],
                                                                                           strict=True)}}
        for k in keys:
            if _extreme(k) is max:
                value = self.dist.max(extremes.get(k, -math.inf))
            elif _extreme(k) is min:
                value = -self.dist.max(-extremes.get(k, math.inf))
            else:
                continue
            self.last_metrics[k] = value if math.isfinite(value) else float("nan")
        self.pass_times.append(time.perf_counter() - t0)
        if not math.isfinite(self.last_metrics["loss"]):
            raise NonFiniteLoss(f"pass {len(self.pass_times)}'s loss over the batch is {self.last_metrics['loss']}")
        return torch.tensor(self.last_metrics["loss"]), {**self.last_metrics, ENTROPY_TOKENS: self.trained_tokens}

    @torch.no_grad()
    def compute_old_logp(self):
        """old_logp_BT of the trained rows at the current weights, no gradient, micro-batched as the passes are:
        the sampling policy's log-probs for a PPO mini-batch that trains after an earlier one has moved the
        weights (taken before any of the rollout step's updates; pass 1 then is not on-policy)."""
        batch, temperature = self.batch, self.cfg.rollout.temperature
        logp_BT = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        for rows, packed in self.micro_batches:
            if rows is None:  # the forward of a zero-loss pass: FSDP2's collectives match the other ranks'
                self.runner("zero_loss")
                continue
            if self.objective is not None:
                logp, _ = self.runner("token_logprobs", batch, rows, packed, temperature=temperature)
            else:
                zeros = torch.zeros(batch.completion_ids[rows].shape[0], device=batch.completion_ids.device)
                _, metrics = (self.runner("token_loss", batch, rows, zeros, temperature=temperature) if packed is None
                              else self.runner("packed_token_loss", batch, packed, zeros, temperature=temperature))
                logp = metrics["logp_BT"]
            logp_BT[rows] = logp.detach().to(logp_BT.dtype)
        self.old_logp_BT = logp_BT

    def _objective_pass(self, rows, packed, token_share, seq_share):
        """loss.objective = "policy": the vocabulary primitive's log-probs and entropies, [objective]'s loss on them
        (micro-batch-local normalizers, weighted by the micro-batch's share as the loss type's normalizer counts:
        sequences or tokens), and the entropy bonus as a token mean over the whole batch (over the top entropy
        quantile's tokens, that quantile taken per micro-batch as TRL takes it per micro-batch). Runs the
        backward; returns (weighted loss, metrics as floats, detached logp [n, T])."""
        batch, cfg = self.batch, self.cfg
        logp, entropy = self.runner("token_logprobs", batch, rows, packed, temperature=cfg.rollout.temperature)
        mask = batch.completion_mask[rows].to(logp.dtype)
        sampled = None if batch.sampled_logp is None else batch.sampled_logp[rows].to(logp.dtype)
        loss, metrics = policy_loss(
            dataclasses.replace(self.objective, entropy_coef=0.0), logp, entropy, self.adv[rows].to(logp.dtype), mask,
            None if self.old_logp_BT is None else self.old_logp_BT[rows].to(logp.dtype),
            None if self.ref is None else self.ref[rows].to(logp.dtype), sampled)
        weight = seq_share if self.objective.loss_type in PER_SEQUENCE_LOSSES else token_share
        weighted = loss * weight
        if self.entropy_coef:
            effective = mask if self.objective.top_entropy_quantile == 1 else \
                mask * high_entropy_mask(entropy, mask, self.objective.top_entropy_quantile)
            bonus = (entropy * effective).sum() / effective.sum().clamp(min=1.0)
            weighted = weighted - self.entropy_coef * bonus * token_share
        (weighted * self.dist.world).backward()  # FSDP2 averages gradients over ranks
        entropy_sum, tokens = self.entropy_sums
        self.entropy_sums = (entropy_sum + float((entropy.detach() * mask).sum()), tokens + float(mask.sum()))
        metrics = {RENAMED_METRICS.get(k, k): float(v) for k, v in metrics.items()}
        return float(weighted.detach()), metrics, logp.detach()


def run_update(rule, closure: LossClosure) -> dict:
    """One update with the configured rule; returns its stats (rule/*, grad norm, passes this step)."""
    rule.step(closure)  # for SFPO the closure's metrics carry entropy_mean, its gate statistic
    stats = {f"rule/{k}": v for k, v in rule.last_stats.items()}
    stats["grad_norm"] = rule.last_grad_norm
    stats["backward_passes_step"] = len(closure.pass_times)
    return stats


def split_groups(batch, advantages, ref_logp_BT, group_sizes: list, n: int) -> list:
    """PPO mini-batches: the rollout batch's prompt groups (rows laid out group after group, group_sizes rows each)
    in n runs of len(group_sizes) / n whole groups, in order; each (batch rows, their advantages, their reference
    log-probs or None), the rows' padding as it was."""
    if len(group_sizes) % n:
        raise ValueError(f"update.mini_batches ({n}) must divide the {len(group_sizes)} prompt groups of the batch")
    per, bounds = len(group_sizes) // n, [0]
    for k in range(n):
        bounds.append(bounds[-1] + sum(group_sizes[k * per:(k + 1) * per]))
    return [(batch.row_slice(lo, hi), advantages[lo:hi], None if ref_logp_BT is None else ref_logp_BT[lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


class MiniBatchClosures:
    """The closures of one rollout step's PPO mini-batches read as the one closure of the step (what the trainer's
    record, entropy control and phase times read). Counts are sums over the mini-batches (total_seqs,
    total_tokens, trained_tokens, entropy_sums); pass_times[i] sums the i-th pass of every mini-batch (so
    time/pass_i is the i-th pass of all of them, and the phases still add up to the step); old_logp_BT and
    trained_mask are the mini-batches' rows stacked back (a mini-batch without old log-probs, one that never ran,
    counts as untrained). last_metrics: loss is the mean of the mini-batches' losses (each its last pass's, over its
    mini-batch); the other means are token means over the mini-batches' trained tokens, the *_min / *_max the
    minimum / maximum. stats: micro_batches_max / _min the maximum / minimum, the fractions token means over the
    mini-batches."""

    def __init__(self, closures: list):
        self.parts = closures
        self.entropy_coef = closures[0].entropy_coef
        self.total_tokens = sum(c.total_tokens for c in closures)
        self.total_seqs = sum(c.total_seqs for c in closures)
        self.trained_tokens = sum(c.trained_tokens for c in closures)

    @property
    def pass_times(self) -> list:
        most = max(len(c.pass_times) for c in self.parts)
        return [sum(c.pass_times[i] for c in self.parts if i < len(c.pass_times)) for i in range(most)]

    @property
    def backward_passes(self) -> int:
        return sum(len(c.pass_times) for c in self.parts)

    @property
    def entropy_sums(self) -> tuple:
        return tuple(sum(c.entropy_sums[i] for c in self.parts) for i in range(2))

    @property
    def old_logp_BT(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(c.trained_mask, dtype=torch.float32) if c.old_logp_BT is None
                          else c.old_logp_BT for c in self.parts])

    @property
    def trained_mask(self) -> torch.Tensor:
        return torch.cat([c.trained_mask if c.old_logp_BT is not None else torch.zeros_like(c.trained_mask)
                          for c in self.parts])

    @property
    def last_metrics(self) -> dict:
        ran = [c for c in self.parts if c.last_metrics]
        out = {"loss": sum(c.last_metrics["loss"] for c in ran) / max(len(ran), 1)}
        for k in dict.fromkeys(k for c in ran for k in c.last_metrics if k != "loss"):
            values = [(c.last_metrics[k], c.trained_tokens) for c in ran if k in c.last_metrics]
            if (pick := _extreme(k)) is not None:
                finite = [v for v, _ in values if math.isfinite(v)]
                out[k] = pick(finite) if finite else float("nan")
            else:
                out[k] = _weighted_mean(values)
        return out

    @property
    def stats(self) -> dict:
        out = {}
        for k in dict.fromkeys(k for c in self.parts for k in c.stats):
            values = [(c.stats[k], c.total_tokens) for c in self.parts if k in c.stats]
            pick = {"micro_batches_max": max, "micro_batches_min": min}.get(k)
            out[k] = pick(v for v, _ in values) if pick else _weighted_mean(values)
        return out


def _weighted_mean(values: list) -> float:
    """sum(v w) / sum(w) over the (value, weight) pairs of positive weight; NaN when there are none."""
    kept = [(v, w) for v, w in values if w > 0]
    total = sum(w for _, w in kept)
    return sum(v * w for v, w in kept) / total if total > 0 else float("nan")


# How one rollout step's mini-batch updates report a rule statistic: the gate's state after the step (its one
# observation: z, gate_stat) and the counters are the last; fallback codes and maxima the largest; every other
# statistic (active: the fraction of mini-batches that extrapolated) the mean over the mini-batches that gave it.
LAST_RULE_STATS = ("rule/backward_passes", "rule/gate_open", "rule/budget_spent", "rule/z", "rule/gate_stat")
MAX_RULE_STATS = ("rule/fallback", "rule/scale_max")


def combine_rule_stats(per_step: list, final: dict) -> dict:
    """The stats of one rollout step made of several run_update calls (per_step, in order): see LAST_RULE_STATS;
    final: the rule's last_stats after the step (after gate_batch() observed); backward_passes_step is the sum."""
    out = {}
    final = {f"rule/{k}": v for k, v in final.items()}
    for k in dict.fromkeys([k for stats in per_step for k in stats] + list(final)):
        values = [stats[k] for stats in per_step if k in stats]
        if k == "backward_passes_step":
            out[k] = sum(values)
        elif k in LAST_RULE_STATS:
            if k in final:
                out[k] = final[k]
            elif values:
                out[k] = values[-1]
        elif k in MAX_RULE_STATS:
            out[k] = max(values)
        elif values:
            out[k] = sum(values) / len(values)
    return out
