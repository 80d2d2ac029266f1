"""One training step's update: the loss closure over the rollout batch (fused LM-head GRPO loss,
micro-batched) and the update rule (grpo: the base optimizer; sfpo; gxpo) that calls it."""

import time

import torch

from gxpo_kernels import GXPO, SFPO, fused_linear_grpo_loss


def decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, model.get_output_embeddings()


def make_update_rule(cfg, params):
    base_kwargs = {"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay}
    if cfg.algo == "grpo":
        return torch.optim.AdamW(params, **base_kwargs)
    if cfg.algo == "gxpo":
        g = cfg.gxpo
        return GXPO(params, base=torch.optim.AdamW, K=g.K, alpha=g.alpha, tau=g.tau, gate=g.gate,
                    gate_stat=g.gate_stat, optimizer_state=g.optimizer_state, max_grad_norm=cfg.optim.max_grad_norm,
                    **base_kwargs)
    s = cfg.sfpo
    return SFPO(params, base=torch.optim.AdamW, K=s.K, alpha=s.alpha, tau=s.tau, gate=s.gate,
                max_grad_norm=cfg.optim.max_grad_norm, **base_kwargs)


class LossClosure:
    """closure() -> (loss, metrics) on a fixed batch. The first call is on-policy (rollouts came from
    the current weights) and its per-token log-probs become old_logp for every later call, so no extra
    forward is needed. Micro-batches are weighted so that the sum equals the whole-batch loss for
    every loss_agg mode. pass_times collects each call's wall-clock."""

    def __init__(self, model, batch, advantages_B, cfg, ref_logp_BT=None):
        self.model, self.batch, self.adv, self.cfg, self.ref = model, batch, advantages_B, cfg, ref_logp_BT
        self.old_logp_BT = None
        self.pass_times = []
        self.last_metrics = {}

    def _micro_batches(self):
        B = self.batch.completion_ids.shape[0]
        size = self.cfg.loss.micro_batch_size or B
        return [slice(i, min(i + size, B)) for i in range(0, B, size)]

    def __call__(self):
        t0 = time.perf_counter()
        cfg, batch = self.cfg, self.batch
        decoder, head = decoder_and_head(self.model)
        B = batch.completion_ids.shape[0]
        n_tokens = batch.completion_mask.sum().clamp(min=1)
        P, T = batch.prompt_len, batch.completion_ids.shape[1]
        max_len = cfg.loss.max_completion_len or cfg.rollout.max_new_tokens
        total_loss, logp_parts, sums = 0.0, [], {}
        for mb in self._micro_batches():
            hidden = decoder(input_ids=batch.input_ids[mb], attention_mask=batch.attention_mask[mb],
                             position_ids=batch.position_ids[mb]).last_hidden_state
            mask_mb = batch.completion_mask[mb]
            loss, metrics = fused_linear_grpo_loss(
                hidden[:, P - 1:P - 1 + T], head.weight, batch.completion_ids[mb], self.adv[mb], mask_mb,
                old_logp_BT=None if self.old_logp_BT is None else self.old_logp_BT[mb],
                ref_logp_BT=None if self.ref is None else self.ref[mb], beta=cfg.loss.beta,
                eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, temperature=cfg.rollout.temperature,
                loss_agg=cfg.loss.loss_agg, max_completion_len=max_len,
                return_entropy=True, lm_head_bias_V=getattr(head, "bias", None))
            if cfg.loss.loss_agg == "token-mean":
                weight = mask_mb.sum() / n_tokens
            else:
                weight = torch.tensor((mb.stop - mb.start) / B)
            (loss * weight).backward()
            total_loss += float(loss.detach()) * float(weight)
            logp_parts.append(metrics.pop("logp_BT"))
            token_share = float(mask_mb.sum() / n_tokens)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * token_share
        if self.old_logp_BT is None:
            self.old_logp_BT = torch.cat(logp_parts).detach()
        self.last_metrics = {"loss": total_loss, **sums}
        self.pass_times.append(time.perf_counter() - t0)
        return torch.tensor(total_loss), dict(self.last_metrics)


def run_update(rule, closure: LossClosure, cfg, params) -> dict:
    """One update with the configured rule; returns its stats (grad norm, last_stats, passes)."""
    if cfg.algo == "grpo":
        rule.zero_grad(set_to_none=True)
        closure()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if torch.isfinite(norm):
            rule.step()
        rule.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "backward_passes_step": 1}
    rule.step(closure)  # for SFPO the closure's metrics carry entropy_mean, its gate statistic
    stats = {f"rule/{k}": v for k, v in rule.last_stats.items()}
    stats["grad_norm"] = rule.last_stats.get("g0_norm", float("nan"))
    stats["backward_passes_step"] = len(closure.pass_times)
    return stats
