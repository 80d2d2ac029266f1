"""GXPO and SFPO inside TRL's GRPOTrainer: change the import, add a few config fields.

    from gxpo_kernels.trl import GXPOTrainer as GRPOTrainer, GXPOConfig as GRPOConfig
    args = GRPOConfig(..., update_rule="gxpo", rule_preset="authors-1p5b")

Same rollouts, rewards, advantages and loss as stock TRL (its `_generate_and_score_completions` and
`compute_loss`). With update_rule "gxpo" or "sfpo" the rule drives a closure over TRL's generation batch:
each call zeroes the gradients and runs TRL's loss and backward over the batch, `rule_micro_batches`
chunks at a time (weighted so that the gradient is the whole batch's for every loss_type), with the
batch's old log-probs fixed before the first pass (one no-grad forward), so later passes see the ratio
to the sampling policy. The base optimizer is the one TRL builds (AdamW, its decay groups, its
schedule); the rule clips (max_grad_norm moves into it). TRL's logs gain `rule/*` (the rule's
last_stats) and cumulative `backward_passes`; checkpoints and resume go through TRL's own mechanism
(the optimizer's state_dict is the rule's, gate included). update_rule "grpo" leaves TRL's update untouched.
Needs one optimizer step per training step: gradient_accumulation_steps 1 and num_iterations 1 (ValueErrors say
so). steps_per_generation S > 1 gives PPO mini-batches: TRL generates, scores and computes the advantages and
old log-probs once per generation batch and trains on it in S slices, and each slice is one rule step (an
optimizer step of TRL's); the rule's gate observes once per generation batch, after its last slice, the token
mean of the slices' corrective-pass entropies (UpdateRule.gate_batch, as the trainer's update.mini_batches).
TRL's slices are its own: the generation batch shuffled by rows, so a prompt's completions may fall in
different slices (the trainer keeps groups whole).

fused_loss=True (any update_rule) computes TRL's loss through our kernels: the log-probs and entropies of
the completion tokens from the vocabulary primitive fused with the LM head
(gxpo_kernels.loss.fused_linear_token_logprobs: the [tokens x vocab] logits never in memory on the tiled
path), then the objective TRL's config names on those [B, T] vectors (gxpo_kernels.loss.policy_loss): every
loss_type, token or sequence importance sampling, delta, the bias-corrected KL, the entropy bonus (with its
gradient) and adaptive entropy control, top-entropy-quantile and off-policy masks, vLLM's importance-sampling
correction in all four modes, with TRL's normalizers and metric names. FUSED_LOSS_OFF names what it does not
do, and why."""

import dataclasses
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from .loss import PolicyObjective, fused_linear_token_logprobs, policy_loss
from .loss.objectives import PER_SEQUENCE_LOSSES, adapted_entropy_coef
from .optim import RULES, rule_config
from .optim.lookahead import ENTROPY_TOKENS

PER_TOKEN_LOSSES = ("bnpo",)  # its share of tokens; dapo / cispo / vespo normalize by the whole batch already
# (field, the value the fused loss needs, why): none; the MoE router's aux loss is refused in GXPOTrainer
# (it needs the router logits of the model's own forward, which the fused path does not run through TRL's).
FUSED_LOSS_OFF = ()


def objective_of(args) -> PolicyObjective:
    """The objective a GRPOConfig names."""
    vllm_correction = args.use_vllm and args.vllm_importance_sampling_correction
    return PolicyObjective(
        loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
        importance_sampling_level=args.importance_sampling_level, beta=args.beta,
        use_bias_correction_kl=args.use_bias_correction_kl, sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold,
        entropy_coef=args.entropy_coef, rollout_correction=args.vllm_importance_sampling_mode if vllm_correction
        else None, rollout_clip_min=args.vllm_importance_sampling_clip_min,
        rollout_clip_max=args.vllm_importance_sampling_clip_max, max_completion_length=args.max_completion_length)


@dataclass
class GXPOConfig(GRPOConfig):
    update_rule: str = field(default="gxpo", metadata={"help": "grpo (stock TRL) or a registered rule: gxpo, sfpo"})
    rule_preset: str | None = field(default=None, metadata={
        "help": "gxpo: authors-1p5b (default) | authors-1p5b-ab | authors-7b | final | paper; sfpo: official"})
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
            for name in ("gradient_accumulation_steps", "num_iterations"):
                if (value := getattr(self, name)) != 1:
                    raise ValueError(f"{name} must be 1 with update_rule={self.update_rule!r}: the rule takes one "
                                     f"step per training step and runs its passes over its batch (got {value})")


    def rule_config(self):
        """The update rule's config (resolved: its preset's values in the fields left unset)."""
        preset = {"preset": self.rule_preset} if self.rule_preset else {}
        return rule_config(self.update_rule, **preset, **self.rule_kwargs).resolved()

    def _check_fused_loss(self):
        for name, needed, what in FUSED_LOSS_OFF:
            if getattr(self, name) != needed:
                raise ValueError(f"fused_loss does not implement {what}: set {name}={needed!r} or fused_loss=False "
                                 f"(got {getattr(self, name)!r})")
        try:
            objective_of(self)
        except ValueError as e:
            raise ValueError(f"fused_loss: {e} (the GRPOConfig field of that name)") from None


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
        slices = self.args.steps_per_generation  # TRL's slice of its generation batch: self._step % slices
        if slices > 1:  # one gate observation per generation batch
            if self._step % slices == 0 and self.rule.in_gate_batch:  # resumed from a checkpoint taken inside
                self.rule.end_gate_batch()  # one (TRL then generates anew): observed with the slices it trained
            if not self.rule.in_gate_batch:
                self.rule.begin_gate_batch()
        loss = self.rule.step(self._closure(model, inputs))
        if slices > 1 and (self._step + 1) % slices == 0:
            self.rule.end_gate_batch()
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
        """TRL's loss and backward over the whole batch, chunk by chunk: (loss, {"entropy_mean", ENTROPY_TOKENS})."""
        tokens = float(self.accelerator.gather(inputs["completion_mask"].sum().reshape(1)).sum())

        def closure():
            total, entropy = 0.0, 0.0
            for chunk, weight, token_share in self._chunks(inputs):
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, chunk) * weight
                self.accelerator.backward(loss)
                total += loss.detach()
                entropy += self._metrics["train"]["entropy"][-1] * token_share
            return torch.as_tensor(total), {"entropy_mean": entropy, ENTROPY_TOKENS: tokens}

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
        logp_BT, entropy_BT = fused_linear_token_logprobs(
            hidden_BTH, head.weight.to(hidden_BTH.dtype), completion_ids, mask,
            lm_head_bias_V=None if head.bias is None else head.bias.to(hidden_BTH.dtype), temperature=self.temperature)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        bonus = self.entropy_coef if not self.use_adaptive_entropy or \
            self._last_world_entropy <= self.args.entropy_target else 0.0
        objective = dataclasses.replace(objective_of(self.args), entropy_coef=bonus if self._entropy_bonus_enabled
                                        else 0.0)
        loss, metrics = policy_loss(
            objective, logp_BT, entropy_BT, inputs["advantages"], mask, inputs.get("old_per_token_logps"),
            inputs.get("ref_per_token_logps"), inputs.get("sampling_per_token_logps"),
            num_items_in_batch=inputs["num_items_in_batch"], accumulation_steps=accumulation,
            steps_per_generation=self.args.steps_per_generation if mode == "train" else 1,
            num_processes=self.accelerator.num_processes, rollout_weight=inputs.get("importance_sampling_ratio"),
            gather=self._gather_all)
        if self.use_adaptive_entropy and mode == "train":
            self._adapt_entropy(entropy_BT.detach(), mask)
        if not self._entropy_bonus_enabled:
            metrics.pop("policy_loss")
        elif mode == "train" and self.accelerator.sync_gradients:
            self._metrics["train"]["entropy_coef"].append(self.entropy_coef)
        self._log_fused_metrics(mode, metrics, mask)
        return loss

    def _gather_all(self, values):
        """Every process's values of a 1-d tensor (of any length per process)."""
        if self.accelerator.num_processes == 1:
            return values
        padded = self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=0, pad_index=-1e9))
        return padded[padded != -1e9]

    def _adapt_entropy(self, entropy_BT, mask):
        """Skywork-OR1's adaptive entropy coefficient, as TRL steps it: at each optimizer step the window's
        token-mean entropy over all processes moves entropy_coef by entropy_coef_delta toward entropy_target."""
        stats = torch.stack([(entropy_BT * mask).sum(), mask.sum()]).float()
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world = (totals[0] / totals[1].clamp(min=1.0)).item()
        self.entropy_coef = adapted_entropy_coef(self.entropy_coef, world, self.args.entropy_target,
                                                 self.args.entropy_coef_delta, self.args.entropy_coef_min,
                                                 self.args.entropy_coef_max)
        self._last_world_entropy, self._entropy_window_stats = world, None

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
        """TRL's metric names: minima and maxima over all processes, the rest token-weighted means over them."""
        count = mask.sum().float()
        extremes = {k: v for k, v in metrics.items() if k.endswith(("_min", "_max", "/min", "/max"))}
        means = {k: v for k, v in metrics.items() if k not in extremes}
        sums = torch.stack([v.detach().float() * count for v in means.values()] + [count])
        totals = self.accelerator.reduce(sums, reduction="sum")
        for key, value in zip(means, (totals[:-1] / totals[-1].clamp(min=1.0)).tolist(), strict=True):
            self._metrics[mode][key].append(value)
        for key, value in extremes.items():
            gathered = self.accelerator.gather(value.detach().float().reshape(1))
            self._metrics[mode][key].append((gathered.min() if key.endswith("min") else gathered.max()).item())

    def log(self, logs, start_time=None):
        if self.rule is not None and self.model.training:
            logs = {**logs, "backward_passes": self.rule.backward_passes}
            if "grad_norm" in logs:  # TRL's loop saw the gradients after the rule had stepped and cleared them
                logs["grad_norm"] = self.rule.last_grad_norm
        return super().log(logs, start_time)
