"""SFPO: K fast steps on the same batch, reposition theta_tilde = theta0 + alpha (theta_K - theta0),
one corrective step; a z-score gate on the batch token entropy falls back to one-pass GRPO.

Preset official (github Urheen/SFPO, train-scripts/*_sfpo.sh and ray_trainer.py): K = 3 fast steps,
alpha = 0.8, the corrective pass's batch entropy against the last 30 values including it, one-sided
z >= 1.0, once the window is full."""

import math
from dataclasses import dataclass

import torch

from .flat import ops as flat_ops
from .lookahead import LookaheadConfig, LookaheadRule


class SFPO(LookaheadRule):
    """sfpo = SFPO(params, base=torch.optim.AdamW, preset="official", lr=...).

    SFPORuleConfig's fields (preset "official"; K, alpha, tau, gate, omega, window, warmup, patience,
    fallback, fallback_window, optimizer_state, delta) come as `config` or as keywords; the other keywords
    go to the base optimizer. An active step calls the closure K + 1 times. The gate statistic is the
    batch token entropy of the corrective pass (at theta_tilde), as the official code reads it: the
    closure returns (loss, {"entropy_mean": H}) (grpo_loss(..., return_entropy=True) metrics do), or
    step(closure, gate_value=H) observes H instead. step() returns the first pass's loss. A non-finite
    gradient in any pass ends the step as one plain step with the first pass's gradient.
    """

    def __init__(self, params, base=torch.optim.AdamW, config=None, *, max_grad_norm=None, allow_bf16_params=False,
                 **kwargs):
        config, base_kwargs = SFPORuleConfig.split(config, kwargs)
        super().__init__(params, base, base_kwargs, config=config, max_grad_norm=max_grad_norm,
                         allow_bf16_params=allow_bf16_params)

    @torch.no_grad()
    def step(self, closure=None, gate_value=None):
        if (loss := self._closed_gate_step(closure)) is not None:
            return loss

        groups = self._flat_groups()
        loss, metrics = self._closure_pass(closure)
        if gate_value is None:
            self._check_entropy(metrics)
        g0_norm = self._snapshot(groups)
        if not math.isfinite(g0_norm):
            self.base.zero_grad(set_to_none=True)
            return self._finish(loss, "nonfinite_g0", g0_norm=g0_norm)
        saved_state = self._save_optimizer_state()
        self._first_step(groups, g0_norm)
        for _ in range(self.K - 1):
            self._closure_pass(closure)
            norm, _ = self._grad_norm(groups)
            if not math.isfinite(norm):
                self._restore_theta0_and_step_with_g0(groups, g0_norm, saved_state)
                return self._finish(loss, "nonfinite_g1", g0_norm=g0_norm)
            self._base_step(norm)
        # theta_tilde = theta0 + alpha * (theta_K - theta0), one pass per group
        step_sq = sum(flat_ops.interpolate(g, alpha=self.alpha).to(groups[0].device) for g in groups)
        step_sq = self._all_reduce(step_sq.reshape(1))  # read with the corrective pass's norm
        self._rollback_before_corrective(saved_state)

        _, metrics = self._closure_pass(closure)  # the corrective pass, at theta_tilde
        norm, _, (step_sq,) = self._read_with(self._grad_dots(groups), step_sq)
        step_norm = math.sqrt(step_sq)
        if not math.isfinite(norm):
            self._restore_theta0_and_step_with_g0(groups, g0_norm, saved_state)
            return self._finish(loss, "nonfinite_gtilde", g0_norm=g0_norm)
        self._base_step(norm)
        self.base.zero_grad(set_to_none=True)
        entropy_of = metrics if gate_value is None else None
        if gate_value is None:
            gate_value = float(metrics.get("entropy_mean", math.nan))  # present unless gate == "never"
        gate = self._observe_gate(gate_value, entropy_of)  # {} inside gate_batch()
        return self._finish(loss, "none", active=1.0, g0_norm=g0_norm, gtilde_norm=norm, **gate, step_norm=step_norm)


@dataclass
class SFPORuleConfig(LookaheadConfig):
    name = "sfpo"
    rule = SFPO
    presets = {"official": {"K": 3, "alpha": 0.8, "tau": 1.0, "gate": "window_inclusive", "omega": 0.1,
                            "window": 30, "warmup": 0}}
    default_preset = "official"

    @property
    def reads_batch_entropy(self) -> bool:
        return self.gate != "never"
