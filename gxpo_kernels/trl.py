"""GXPO and SFPO inside TRL's GRPOTrainer: change the import, add a few config fields.

    from gxpo_kernels.trl import GXPOTrainer as GRPOTrainer, GXPOConfig as GRPOConfig
    args = GRPOConfig(..., update_rule="gxpo", rule_preset="final")

Same rollouts, rewards, advantages and loss as stock TRL (its `_generate_and_score_completions` and
`compute_loss`). With update_rule "gxpo" or "sfpo" the rule drives a closure over TRL's generation batch:
each call zeroes the gradients and runs TRL's loss and backward over the batch, `rule_micro_batches`
chunks at a time (weighted so that the gradient is the whole batch's for every loss_type), with the
batch's old log-probs fixed before the first pass (one no-grad forward), so later passes see the ratio
to the sampling policy. The base optimizer is the one TRL builds (AdamW, its decay groups, its
schedule); the rule clips (max_grad_norm moves into it). TRL's logs gain `rule/*` (the rule's
last_stats) and cumulative `backward_passes`; checkpoints and resume go through TRL's own mechanism
(the optimizer's state_dict is the rule's, gate included). update_rule "grpo" leaves TRL's update untouched.
Needs one optimizer step per generation batch: gradient_accumulation_steps 1, steps_per_generation 1,
num_iterations 1 (ValueErrors say so).

fused_loss=True (any update_rule) replaces TRL's loss by ours, fused with the LM head
(gxpo_kernels.fused_linear_grpo_loss: on CUDA the tiled Triton kernels, which never hold the
[tokens x vocab] logits and compute log-probs, entropy, the clipped loss and its gradient in one pass):
the same loss and gradient as TRL's for loss_type grpo, bnpo, dr_grpo and dapo with token-level
importance sampling, and TRL's entropy, kl and clip_ratio/{low,high,region}_mean metrics. TRL options the
fused loss does not implement are ValueErrors (FUSED_LOSS_OFF names them)."""

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from .loss import fused_linear_grpo_loss
from .optim import RULES, rule_config

PER_SEQUENCE_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")  # a micro-batch weighs its share of sequences
PER_TOKEN_LOSSES = ("bnpo",)  # its share of tokens; dapo / cispo / vespo normalize by the whole batch already
FUSED_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                  "dapo": "token-mean"}  # TRL loss_type -> our loss_agg (dapo rescaled to TRL's normalizer)
# (field, the value the fused loss needs, why): TRL options our loss does not implement
FUSED_LOSS_OFF = (("importance_sampling_level", "token", "sequence-level ratios"),
                  ("delta", None, "two-sided clipping"), ("off_policy_mask_threshold", None, "off-policy masks"),
                  ("top_entropy_quantile", 1.0, "entropy masks"), ("entropy_coef", 0.0, "entropy bonuses"),
                  ("use_adaptive_entropy", False, "adaptive entropy"))


@dataclass
class GXPOConfig(GRPOConfig):
    update_rule: str = field(default="gxpo", metadata={"help": "grpo (stock TRL) or a registered rule: gxpo, sfpo"})
    rule_preset: str | None = field(default=None, metadata={"help": "gxpo: final | paper; sfpo: official"})
    rule_kwargs: dict = field(default_factory=dict, metadata={
        "help": "the rule's config fields (gxpo_kernels.optim.RULES[update_rule]): K, alpha, tau, gate, window, ..."})
    rule_micro_batches: int = field(default=1, metadata={"help": "chunks of the batch per closure pass"})
    fused_loss: bool = field(default=False, metadata={"help": "our loss fused with the LM head instead of TRL's"})

    def __post_init__(self):
        super().__post_init__()
        if self.update_rule not in RULES:
            raise ValueError(f"update_rule must be one of {tuple(RULES)}, got {self.update_rule!r}")
        try:
            self.rule_config().check()
        except ValueError as e:
            raise ValueError(f"update_rule={self.update_rule!r}, rule_preset / rule_kwargs: {e}") from None
        if self.rule_micro_batches < 1:
            raise ValueError(f"rule_micro_batches must be >= 1, got {self.rule_micro_batches}")
        if self.fused_loss:
            self._check_fused_loss()
        if self.update_rule != "grpo":
            for name in ("gradient_accumulation_steps", "steps_per_generation", "num_iterations"):
                if (value := getattr(self, name)) != 1:
                    raise ValueError(f"{name} must be 1 with update_rule={self.update_rule!r}: the rule takes one "
                                     f"step per generation batch and runs its passes over it (got {value})")


    def rule_config(self):
        """The update rule's config (resolved: its preset's values in the fields left unset)."""
        preset = {"preset": self.rule_preset} if self.rule_preset else {}
        return rule_config(self.update_rule, **preset, **self.rule_kwargs).resolved()

    def _check_fused_loss(self):
        if self.loss_type not in FUSED_LOSS_AGG:
            raise ValueError(f"fused_loss supports loss_type {tuple(FUSED_LOSS_AGG)}, got {self.loss_type!r}")
        for name, needed, what in FUSED_LOSS_OFF:
            if getattr(self, name) != needed:
                raise ValueError(f"fused_loss does not implement {what}: set {name}={needed!r} or fused_loss=False "
                                 f"(got {getattr(self, name)!r})")
        if self.beta != 0.0 and self.use_bias_correction_kl:
            raise ValueError("fused_loss computes the plain k3 KL: set use_bias_correction_kl=False with beta != 0")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError("fused_loss has no vLLM importance-sampling correction: set "
                             "vllm_importance_sampling_correction=False or fused_loss=False")


class RuleOptimizer(torch.optim.Optimizer):
    """What TRL's loop sees as the optimizer: the rule already stepped inside training_step, so step() is
    a no-op; param_groups are the base optimizer's (the LR schedule reaches it); state_dict is the rule's."""

    def __init__(self, rule):
        super().__init__([p for g in rule.param_groups for p in g["params"]], {})
        self.rule = rule
        self.defaults = rule.defaults
        self.param_groups = rule.param_groups
        self.state = rule.base.state

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("RuleOptimizer.step: the update rule already stepped in training_step")

    def zero_grad(self, set_to_none: bool = True):
        self.rule.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.rule.state_dict()

    def load_state_dict(self, state_dict):
        self.rule.load_state_dict(state_dict)


class GXPOTrainer(GRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = None
        if not isinstance(self.args, GXPOConfig):
            raise ValueError(f"GXPOTrainer needs a GXPOConfig for args, got {type(self.args).__name__}")
        if self.args.fused_loss and self.aux_loss_enabled:  # known once the model is
            raise ValueError("fused_loss has no MoE router aux loss: set router_aux_loss_coef=0 or fused_loss=False")

    def create_optimizer(self, model=None):
        base = super().create_optimizer(*([model] if model is not None else []))
        if self.args.update_rule == "grpo":
            return base
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        self.args.max_grad_norm = 0.0  # the rule clips; TRL's loop would only see the zeroed gradients
        params = [p for g in base.param_groups for p in g["params"]]
        self.rule = self.args.rule_config().build(params, base, max_grad_norm=max_norm)
        self.optimizer = RuleOptimizer(self.rule)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.rule is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if inputs.get("old_per_token_logps") is None:  # the sampling policy's log-probs for every pass
            inputs["old_per_token_logps"] = self._sampling_logps(model, inputs)
        loss = self.rule.step(self._closure(model, inputs))
        for key, value in self.rule.last_stats.items():
            self._metrics["train"][f"rule/{key}"].append(float(value))
        self._step += 1
        return torch.as_tensor(loss).detach()

    def _sampling_logps(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, inputs["completion_ids"].size(1))
        return logps

    def _chunks(self, inputs):
        """(chunk, loss weight, token share): the batch in rule_micro_batches row chunks."""
        n = inputs["completion_ids"].size(0)
        bounds = torch.linspace(0, n, self.args.rule_micro_batches + 1).round().long().tolist()
        tokens = inputs["completion_mask"].sum().clamp(min=1)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi == lo:
                continue
            chunk = {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == n else v)
                     for k, v in inputs.items()}
            token_share = float(chunk["completion_mask"].sum() / tokens)
            weight = ((hi - lo) / n if self.loss_type in PER_SEQUENCE_LOSSES
                      else token_share if self.loss_type in PER_TOKEN_LOSSES else 1.0)
            yield chunk, weight, token_share

    def _closure(self, model, inputs):
        """TRL's loss and backward over the whole batch, chunk by chunk: (loss, {"entropy_mean"})."""

        def closure():
            total, entropy = 0.0, 0.0
            for chunk, weight, token_share in self._chunks(inputs):
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, chunk) * weight
                self.accelerator.backward(loss)
                total += loss.detach()
                entropy += self._metrics["train"]["entropy"][-1] * token_share
            return torch.as_tensor(total), {"entropy_mean": entropy}

        return closure

    def _compute_loss(self, model, inputs):
        if not self.args.fused_loss:
            return super()._compute_loss(model, inputs)
        completion_ids = inputs["completion_ids"]
        L = completion_ids.size(1)
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden_BTH = self._final_hidden(model, ids, attention)[:, -L - 1:-1]  # each predicts a completion token
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss, metrics = fused_linear_grpo_loss(
            hidden_BTH, head.weight.to(hidden_BTH.dtype), completion_ids, inputs["advantages"], mask,
            old_logp_BT=inputs.get("old_per_token_logps"),
            ref_logp_BT=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None, beta=self.beta,
            eps_low=self.epsilon_low, eps_high=self.epsilon_high, temperature=self.temperature,
            loss_agg=FUSED_LOSS_AGG[self.loss_type], max_completion_len=self.max_completion_length,
            return_entropy=True, lm_head_bias_V=None if head.bias is None else head.bias.to(hidden_BTH.dtype))
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":  # TRL: the token sum over the generation batch's token count per process
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            loss = loss * mask.sum().clamp(min=1.0) / normalizer
        else:
            loss = loss / accumulation
        self._log_fused_metrics(mode, metrics, mask)
        return loss

    def _final_hidden(self, model, ids, attention):
        """The decoder's last hidden state [B, T, H], taken from a forward of the (wrapped) model that projects
        only one position through the LM head. A hook on the decoder, not output_hidden_states: under
        reentrant gradient checkpointing those are recorded in the no-grad first forward."""
        captured = []
        decoder = self.accelerator.unwrap_model(model).get_decoder()
        handle = decoder.register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            with self.accelerator.autocast():
                model(input_ids=ids, attention_mask=attention, logits_to_keep=1)
        finally:
            handle.remove()
        assert len(captured) == 1, f"the decoder ran {len(captured)} times in one forward"
        return captured[0]

    def _log_fused_metrics(self, mode, metrics, mask):
        """TRL's metric names, each a token mean over all processes."""
        count = mask.sum().float()
        names = {"entropy": "entropy_mean", "clip_ratio/low_mean": "clip_frac_low",
                 "clip_ratio/high_mean": "clip_frac_high", **({"kl": "kl_mean"} if "kl_mean" in metrics else {})}
        sums = torch.stack([metrics[ours].detach().float() * count for ours in names.values()] + [count])
        totals = self.accelerator.reduce(sums, reduction="sum")
        means = dict(zip(names, (totals[:-1] / totals[-1].clamp(min=1.0)).tolist(), strict=True))
        means["clip_ratio/region_mean"] = means["clip_ratio/low_mean"] + means["clip_ratio/high_mean"]
        for key, value in means.items():
            self._metrics[mode][key].append(value)

    def log(self, logs, start_time=None):
        if self.rule is not None and self.model.training:
            logs = {**logs, "backward_passes": self.rule.backward_passes}
            if "grad_norm" in logs:  # TRL's loop saw the gradients after the rule had stepped and cleared them
                logs["grad_norm"] = self.rule.last_grad_norm
        return super().log(logs, start_time)
