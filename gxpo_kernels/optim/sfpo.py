"""SFPO: K fast steps on the same batch, reposition theta_tilde = theta0 + alpha (theta_K - theta0),
one corrective step; a z-score gate on the batch token entropy falls back to one-pass GRPO."""

import math

import torch

from ..extrapolation import DELTA
from ..ops import flat_ops
from .gate import ZScoreGate
from .lookahead import LookaheadRule
from .presets import DEFAULT_SFPO_PRESET, SFPO_PRESETS, check_hyperparameters, resolve


class SFPO(LookaheadRule):
    """sfpo = SFPO(params, base=torch.optim.AdamW, preset="official", lr=...).

    preset "official" (see presets.py) sets K, alpha, tau, gate, omega, window and warmup; any of them
    given here overrides it. An active step calls the closure K + 1 times. The gate statistic is the
    batch token entropy of the corrective pass (at theta_tilde), as the official code reads it: the
    closure returns (loss, {"entropy_mean": H}) (grpo_loss(..., return_entropy=True) metrics do), or
    step(closure, gate_value=H) observes H instead. step() returns the first pass's loss. A non-finite
    gradient in any pass ends the step as one plain step with the first pass's gradient.
    """

    def __init__(self, params, base=torch.optim.AdamW, preset=DEFAULT_SFPO_PRESET, K=None, alpha=None, tau=None,
                 gate=None, omega=None, window=None, warmup=None, patience=1, fallback="permanent", fallback_window=10,
                 optimizer_state="accumulate", max_grad_norm=None, delta=DELTA, allow_bf16_params=False,
                 **base_kwargs):
        h = resolve(SFPO_PRESETS, preset, "SFPO", K=K, alpha=alpha, tau=tau, gate=gate, omega=omega, window=window,
                    warmup=warmup)
        check_hyperparameters("SFPO", h)
        K, alpha = h["K"], h["alpha"]
        gate_obj = ZScoreGate(h["gate"], h["tau"], h["omega"], h["window"], patience, fallback, fallback_window,
                              h["warmup"])
        super().__init__(params, base, base_kwargs, gate=gate_obj, optimizer_state=optimizer_state,
                         max_grad_norm=max_grad_norm, delta=delta, allow_bf16_params=allow_bf16_params)
        self.preset, self.K, self.alpha = preset, K, alpha

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
                self._restore_theta0_and_step_with_g0(groups, g0_norm)
                return self._finish(loss, "nonfinite_g1", g0_norm=g0_norm)
            self._base_step(norm)
        # theta_tilde = theta0 + alpha * (theta_K - theta0), one pass per group
        step_sq = sum(flat_ops.interpolate(g, alpha=self.alpha).to(groups[0].device) for g in groups)
        step_sq = self._all_reduce(step_sq.reshape(1))  # read with the corrective pass's norm
        self._load_optimizer_state(saved_state)

        _, metrics = self._closure_pass(closure)  # the corrective pass, at theta_tilde
        norm, _, (step_sq,) = self._read_with(self._grad_dots(groups), step_sq)
        step_norm = math.sqrt(step_sq)
        if not math.isfinite(norm):
            self._restore_theta0_and_step_with_g0(groups, g0_norm)
            return self._finish(loss, "nonfinite_gtilde", g0_norm=g0_norm)
        self._base_step(norm)
        self.base.zero_grad(set_to_none=True)
        if gate_value is None:
            gate_value = float(metrics.get("entropy_mean", math.nan))  # present unless gate == "never"
        z = self.gate.observe(gate_value)
        return self._finish(loss, "none", active=1.0, g0_norm=g0_norm, gtilde_norm=norm, z=z, gate_stat=gate_value,
                            step_norm=step_norm)
