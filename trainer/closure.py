"""One training step's update: the loss closure over the rollout batch (fused LM-head GRPO loss,
micro-batched, normalized over all ranks) and the update rule (GRPO, SFPO or GXPO)
that calls it."""

import time

import torch

from gxpo_kernels import FlatAdamW

from .distributed import SINGLE, Dist
from .packing import pack, padding_fractions


def make_update_rule(cfg, params):
    """The configured rule (cfg.algo's section, through gxpo_kernels.optim.RULES) over the base optimizer."""
    base_kwargs = {"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay}
    base = FlatAdamW if cfg.optim.name == "flat_adamw" else torch.optim.AdamW
    return cfg.rule.build(params, base, max_grad_norm=cfg.optim.max_grad_norm, allow_bf16_params=cfg.bf16_params,
                          **base_kwargs)


def gate_reads_batch_entropy(cfg) -> bool:
    """The update rule's gate observes the corrective pass's entropy over the whole batch."""
    return cfg.rule.reads_batch_entropy


def skips_zero_advantages(cfg) -> bool:
    """Completions whose advantage is zero leave every pass when that is exact: no KL term (their loss and
    gradient are then identically 0), and no gate that reads the batch's entropy (which would lose them)."""
    return cfg.loss.skip_zero_advantage and cfg.loss.beta == 0 and not gate_reads_batch_entropy(cfg)


METRIC_KEYS = ("clip_frac_high", "clip_frac_low", "entropy_mean", "ratio_mean")  # grpo_loss's, as the closure calls it


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

    def __init__(self, runner, batch, advantages_B, cfg, ref_logp_BT=None, dist: Dist = SINGLE):
        self.runner, self.batch, self.adv, self.cfg, self.ref, self.dist = runner, batch, advantages_B, cfg, \
            ref_logp_BT, dist
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
        total_loss, sums = 0.0, {}
        logp_BT = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)
        if not self.micro_batches:  # every completion skipped on every rank: the gradient is zero
            for p in self.runner.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        for rows, packed in self.micro_batches:
            if rows is None:
                self.runner("zero_loss").backward()
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
            mask_mb = batch.completion_mask[rows]
            token_share = float(mask_mb.sum()) / max(self.total_tokens, 1.0)
            seq_share = mask_mb.shape[0] / self.total_seqs
            weight = token_share if cfg.loss.loss_agg == "token-mean" else seq_share
            (loss * (weight * self.dist.world)).backward()  # FSDP2 averages gradients over ranks
            total_loss += float(loss.detach()) * weight
            logp_BT[rows] = metrics.pop("logp_BT").detach().to(logp_BT.dtype)
            metric_share = float(mask_mb.sum()) / max(self.trained_tokens, 1.0)  # means over trained tokens
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * metric_share
        if self.old_logp_BT is None:
            self.old_logp_BT = logp_BT
        # the same keys on every rank, also on one whose completions were all skipped (it ran no loss)
        keys = sorted(METRIC_KEYS + (("kl_mean",) if self.ref is not None else ()))
        assert set(sums) <= set(keys), f"loss metrics {sorted(set(sums) - set(keys))} missing from METRIC_KEYS"
        reduced = self.dist.sum([total_loss] + [sums.get(k, 0.0) for k in keys])
        nan_if_untrained = (lambda v: v) if self.trained_tokens else (lambda v: float("nan"))  # nothing was scored
        self.last_metrics = {"loss": reduced[0], **{k: nan_if_untrained(v) for k, v in zip(keys, reduced[1:],
                                                                                           strict=True)}}
        self.pass_times.append(time.perf_counter() - t0)
        return torch.tensor(self.last_metrics["loss"]), dict(self.last_metrics)


def run_update(rule, closure: LossClosure) -> dict:
    """One update with the configured rule; returns its stats (rule/*, grad norm, passes this step)."""
    rule.step(closure)  # for SFPO the closure's metrics carry entropy_mean, its gate statistic
    stats = {f"rule/{k}": v for k, v in rule.last_stats.items()}
    stats["grad_norm"] = rule.last_grad_norm
    stats["backward_passes_step"] = len(closure.pass_times)
    return stats
