"""GXPO: two fast steps, per-coordinate retention-ratio extrapolation to a virtual K-step point,
a partial move, one corrective step; a z-score gate falls back to one-pass GRPO (docs/algorithm.md)."""

import math

import torch

from ..extrapolation import DELTA, EXTRAP_STATS, TINY_G0_NORM
from ..ops import flat_ops
from .gate import ZScoreGate
from .lookahead import LookaheadRule
from .presets import DEFAULT_GXPO_PRESET, GATE_STATS, GXPO_PRESETS, check_hyperparameters, resolve

__all__ = ["GXPO", "GATE_STATS"]


def _cos(dot, a, b):
    return dot / (a * b) if a > 0 and b > 0 else 0.0


class GXPO(LookaheadRule):
    """opt = GXPO(model.parameters(), base=torch.optim.AdamW, preset="final", lr=1e-6); opt.step(closure).

    preset ("final" or "paper", see presets.py) sets K, alpha, tau, gate, gate_stat, omega, window and
    warmup; any of them given here overrides it. Diagnostics follow the authors: r_mean, r_std and
    scale_mean average over all coordinates (inactive ones count as 1); r_mean_active and
    scale_mean_active over the active coordinates only.

    An active step calls the closure three times (backward_passes += 3); once the gate has tripped,
    once. step() returns the loss of the first pass (at the parameters before the step). With
    optimizer_state="accumulate" the base optimizer's moments and step count advance on all three
    steps; "transactional" restores them to their pre-step value before the corrective step.
    Non-finite or tiny ||g0||, or a non-finite g1 or g~, ends the step as one plain step (nothing
    non-finite reaches the parameters; a non-finite g0 skips the step); last_stats["fallback"] says
    which (see FALLBACK_CODES). In accumulate mode a pass-3 fallback keeps the moments of the two
    discarded steps.
    """

    def __init__(self, params, base=torch.optim.AdamW, preset=DEFAULT_GXPO_PRESET, K=None, alpha=None, tau=None,
                 gate=None, gate_stat=None, omega=None, window=None, warmup=None, patience=1, fallback="permanent",
                 fallback_window=10, optimizer_state="accumulate", max_grad_norm=None, delta=DELTA,
                 allow_bf16_params=False, **base_kwargs):
        h = resolve(GXPO_PRESETS, preset, "GXPO", K=K, alpha=alpha, tau=tau, gate=gate, gate_stat=gate_stat,
                    omega=omega, window=window, warmup=warmup)
        check_hyperparameters("GXPO", h)
        K, alpha, gate_stat = h["K"], h["alpha"], h["gate_stat"]
        gate_obj = ZScoreGate(h["gate"], h["tau"], h["omega"], h["window"], patience, fallback, fallback_window,
                              h["warmup"])
        super().__init__(params, base, base_kwargs, gate=gate_obj, optimizer_state=optimizer_state,
                         max_grad_norm=max_grad_norm, delta=delta, allow_bf16_params=allow_bf16_params)
        self.preset, self.K, self.alpha, self.gate_stat = preset, K, alpha, gate_stat

    @torch.no_grad()
    def step(self, closure=None):
        if (loss := self._closed_gate_step(closure)) is not None:
            return loss

        groups = self._flat_groups()
        loss, metrics = self._closure_pass(closure)
        if self.gate_stat == "entropy":
            self._check_entropy(metrics)
        g0_norm = self._snapshot(groups)
        if not math.isfinite(g0_norm) or g0_norm <= TINY_G0_NORM:
            reason = "tiny_g0" if math.isfinite(g0_norm) else "nonfinite_g0"
            if reason == "tiny_g0":
                self._base_step(g0_norm)
            self.base.zero_grad(set_to_none=True)
            return self._finish(loss, reason, g0_norm=g0_norm)
        saved_state = self._save_optimizer_state()
        self._first_step(groups, g0_norm)  # theta1

        self._closure_pass(closure)
        g1_norm, _ = self._grad_norm(groups)
        if not math.isfinite(g1_norm):  # theta1 already is exactly one plain step from theta0
            self.base.zero_grad(set_to_none=True)
            return self._finish(loss, "nonfinite_g1", g0_norm=g0_norm)
        if self._fused_base():  # theta2 stays in the kernel's registers; theta_tilde is written
            sums = self.base.fused_step(groups, self._clip_coef(g1_norm),
                                        extrapolate={"K": self.K, "alpha": self.alpha, "delta": self.delta})
        else:
            g1_scale = 1.0 / self._clip(g1_norm)
            self.base.step()  # theta2
            sums = flat_ops.combine_stats(torch.stack([
                flat_ops.extrapolate(g, g.local_grads(), K=self.K, alpha=self.alpha, delta=self.delta,
                                     g1_scale=g1_scale).to(groups[0].device) for g in groups]))
        n_total = self._n_total(groups)
        sums = self._all_reduce(sums, with_max=True)  # read with pass 3's norms: one host read per pass
        self._load_optimizer_state(saved_state)

        _, metrics = self._closure_pass(closure)  # at theta_tilde
        gt_norm, g0_gt, sums = self._read_with(self._grad_dots(groups, with_g0=True), sums)
        sums = dict(zip(EXTRAP_STATS, sums, strict=True))
        if not math.isfinite(gt_norm):
            self._restore_theta0_and_step_with_g0(groups, g0_norm)
            return self._finish(loss, "nonfinite_gtilde", g0_norm=g0_norm)
        self._base_step(gt_norm)
        self.base.zero_grad(set_to_none=True)

        if self.gate_stat == "entropy":
            h = float(metrics.get("entropy_mean", math.nan))  # present unless gate == "never" (checked in pass 1)
        else:
            h = gt_norm if self.gate_stat == "trajectory" else g0_norm
        z = self.gate.observe(h)
        n_active, n_total = max(sums["n_active"], 1.0), max(n_total, 1.0)
        n_inactive = n_total - sums["n_active"]  # r = scale = 1 there
        r_mean = (sums["r_sum"] + n_inactive) / n_total
        return self._finish(
            loss, "none", active=1.0, g0_norm=g0_norm, g1_norm=g1_norm, gtilde_norm=gt_norm,
            cos_g0_g1=_cos(sums["g0_g1"], math.sqrt(sums["g0_sq"]), math.sqrt(sums["g1_sq"])),
            cos_g0_gtilde=_cos(g0_gt, g0_norm, gt_norm),
            r_mean=r_mean, r_std=math.sqrt(max((sums["r_sq"] + n_inactive) / n_total - r_mean**2, 0.0)),
            scale_mean=(sums["scale_sum"] + n_inactive) / n_total, scale_max=sums["scale_max"],
            r_mean_active=sums["r_sum"] / n_active, scale_mean_active=sums["scale_sum"] / n_active,
            step_norm=math.sqrt(sums["d_sq"]), scaled_step_norm=math.sqrt(sums["scaled_d_sq"]),
            inactive_frac=n_inactive / n_total,
            ratio_clip_frac=sums["n_clipped"] / n_active, z=z, gate_stat=h,
        )
