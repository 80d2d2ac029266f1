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
(the optimizer's state_dict is the rule's, gate included). update_rule "grpo" leaves TRL untouched.
Needs one optimizer step per generation batch: gradient_accumulation_steps 1, steps_per_generation 1,
num_iterations 1 (ValueErrors say so)."""

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from .optim import GXPO, SFPO

RULES = ("grpo", "gxpo", "sfpo")
PER_SEQUENCE_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")  # a micro-batch weighs its share of sequences
PER_TOKEN_LOSSES = ("bnpo",)  # its share of tokens; dapo / cispo / vespo normalize by the whole batch already


@dataclass
class GXPOConfig(GRPOConfig):
    update_rule: str = field(default="gxpo", metadata={"help": "grpo (stock TRL), gxpo or sfpo"})
    rule_preset: str | None = field(default=None, metadata={"help": "gxpo: final | paper; sfpo: official"})
    rule_kwargs: dict = field(default_factory=dict, metadata={"help": "overrides: K, alpha, tau, gate, window, ..."})
    rule_micro_batches: int = field(default=1, metadata={"help": "chunks of the batch per closure pass"})

    def __post_init__(self):
        super().__post_init__()
        if self.update_rule not in RULES:
            raise ValueError(f"update_rule must be one of {RULES}, got {self.update_rule!r}")
        if self.rule_micro_batches < 1:
            raise ValueError(f"rule_micro_batches must be >= 1, got {self.rule_micro_batches}")
        if self.update_rule != "grpo":
            for name in ("gradient_accumulation_steps", "steps_per_generation", "num_iterations"):
                if (value := getattr(self, name)) != 1:
                    raise ValueError(f"{name} must be 1 with update_rule={self.update_rule!r}: the rule takes one "
                                     f"step per generation batch and runs its passes over it (got {value})")


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

    def create_optimizer(self, model=None):
        base = super().create_optimizer(*([model] if model is not None else []))
        if self.args.update_rule == "grpo":
            return base
        rule_cls = GXPO if self.args.update_rule == "gxpo" else SFPO
        preset = {"preset": self.args.rule_preset} if self.args.rule_preset else {}
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        self.args.max_grad_norm = 0.0  # the rule clips; TRL's loop would only see the zeroed gradients
        params = [p for g in base.param_groups for p in g["params"]]
        self.rule = rule_cls(params, base=base, max_grad_norm=max_norm, **preset, **self.args.rule_kwargs)
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

    def log(self, logs, start_time=None):
        if self.rule is not None and self.model.training:
            logs = {**logs, "backward_passes": self.rule.backward_passes}
        return super().log(logs, start_time)
