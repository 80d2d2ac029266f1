"""GXPO: two fast steps, per-coordinate retention-ratio extrapolation to a virtual K-step point,
a partial move, one corrective step; a z-score gate falls back to one-pass GRPO (docs/algorithm.md).

Presets, each as the authors ran it (github SwapniL-afk-now/final-gxpo):
- paper: the paper-era code (commit 1aeea653, "paper reproduction"; Algorithm 1's defaults): K = 5,
  alpha = 0.5, EMA gate on the corrective gradient's pre-clip norm ||g~|| from mu = sigma = 1, w = 0.1,
  two-sided |Z| >= 0.5, no warm-up.
- final: the authors' final runs (train-scripts/final run scripts/run_gxpo.sh: K = 3, alpha = 0.5,
  gxpo_tau = 2.0) under their final trainer, whose gate is SFPO's: the corrective pass's batch entropy
  against the last 30 values including it, one-sided Z >= 2.0, once the window is full
  (verl/trainer/ppo/ray_trainer.py, gxpo_trigger_signal = "entropy"; gxpo_warmup_steps = 0).
- authors-1p5b (the default), authors-1p5b-ab, authors-7b: the authors' current launchers (AUTHORS_PRESETS
  below): retention in the optimizer's own space, transactional optimizer state, the entropy window gate
  after a warm-up. Its gate is scale-free, where the paper-era EMA starting from mu = sigma = 1 trips within a
  step or two whenever ||g~|| is far from 1."""

import math
from dataclasses import dataclass

import torch

from . import fused_retention
from .flat import ops as flat_ops
from .flat.extrapolation import EXTRAP_STATS, TINY_G0_NORM
from .lookahead import LookaheadConfig, LookaheadRule
from .retention_step import RETENTION_SPACES, Probe, clip_multiplier, family_stats, reposition_stats, resolve_space
from .retention_step import extrapolate as extrapolate_in_space

__all__ = ["GXPO", "GXPORuleConfig", "GATE_STATS"]

# trajectory: pre-clip ||g~|| of the corrective pass; g0: pre-clip ||g0||; entropy: the corrective pass's
# batch token entropy (the closure returns (loss, {"entropy_mean": H})); cosine: 1 - |cos(g0, g~)| (the
# authors' gxpo_shutoff_mode = "cosine"). With skip_corrective the probe pass 2 stands in for the corrective
# one where the authors' does: ||g1|| for trajectory, pass 1's entropy, g~ = 0 for cosine.
GATE_STATS = ("trajectory", "g0", "entropy", "cosine")
COSINE_EPS = 1e-12  # the authors' <g0, g~> / (||g0|| ||g~|| + 1e-12)


def _cos(dot, a, b):
    return dot / (a * b) if a > 0 and b > 0 else 0.0


class GXPO(LookaheadRule):
    """opt = GXPO(model.parameters(), base=torch.optim.AdamW, lr=1e-6); opt.step(closure).

    GXPORuleConfig's fields (its preset and every knob, LookaheadConfig's included) come as `config` or as
    keywords; the other keywords go to the base optimizer. Diagnostics follow the authors: r_mean, r_std and
    scale_mean average over all coordinates (inactive ones count as 1); r_mean_active and
    scale_mean_active over the active coordinates only.

    An active step calls the closure three times (backward_passes += 3; twice with skip_corrective); once
    the gate has tripped, once. step() returns the loss of the first pass (at the parameters before the
    step). optimizer_state: see lookahead.OPTIMIZER_STATES.
    Non-finite or tiny ||g0||, or a non-finite g1 or g~, ends the step as one plain step (nothing
    non-finite reaches the parameters; a non-finite g0 skips the step); last_stats["fallback"] says
    which (see FALLBACK_CODES). In accumulate mode a pass-3 fallback keeps the moments of the two
    discarded steps.
    """

    def __init__(self, params, base=torch.optim.AdamW, config=None, *, max_grad_norm=None, allow_bf16_params=False,
                 **kwargs):
        config, base_kwargs = GXPORuleConfig.split(config, kwargs)
        super().__init__(params, base, base_kwargs, config=config, max_grad_norm=max_grad_norm,
                         allow_bf16_params=allow_bf16_params)
        self.gate_stat, self.skip_corrective = config.gate_stat, config.skip_corrective
        self.space = resolve_space(config.retention_space, self.base)
        self.min_effective_multiplier = config.min_effective_multiplier

    @torch.no_grad()
    def step(self, closure=None):
        if (loss := self._closed_gate_step(closure)) is not None:
            return loss

        groups = self._flat_groups()
        loss, pass1_metrics = self._closure_pass(closure)
        if self.gate_stat == "entropy":
            self._check_entropy(pass1_metrics)
        g0_norm = self._snapshot(groups)
        if not math.isfinite(g0_norm) or g0_norm <= TINY_G0_NORM:
            reason = "tiny_g0" if math.isfinite(g0_norm) else "nonfinite_g0"
            if reason == "tiny_g0":
                self._base_step(g0_norm)
            self.base.zero_grad(set_to_none=True)
            return self._finish(loss, reason, g0_norm=g0_norm)
        saved_state = self._save_optimizer_state()
        fused_space = self.space != "raw_grad" and self._fused_base()  # the authors' spaces inside FlatAdamW
        if fused_space:  # theta1, the snapshot and each tensor's sum of squared ratio denominators
            den_sq = self.base.fused_step(groups, self._clip_coef(g0_norm), snapshot=True,
                                          retention=fused_retention.pass1(groups, self.space))
        else:
            self._first_step(groups, g0_norm)  # theta1
        probe = None if self.space == "raw_grad" or fused_space else Probe(self.space)
        if probe is not None:
            probe.after_first_step(groups, self.base, self._had_grad)

        self._closure_pass(closure)
        g1_norm, _ = self._grad_norm(groups)
        if not math.isfinite(g1_norm):  # theta1 already is exactly one plain step from theta0
            self.base.zero_grad(set_to_none=True)
            return self._finish(loss, "nonfinite_g1", g0_norm=g0_norm)
        c0, c1 = (clip_multiplier(norm, self.max_grad_norm) for norm in (g0_norm, g1_norm))  # as the authors record
        if probe is not None:  # the authors' retention spaces (optim/retention_step.py), after a plain step
            probe.after_second_backward(groups)
            self._clip(g1_norm)
            self.base.step()  # theta2
            sums = extrapolate_in_space(
                probe, groups, self.base, self._had_grad, K=self.K, alpha=self.alpha, delta=self.delta,
                min_eff=self.min_effective_multiplier, c0=c0, c1=c1, all_reduce=self._all_reduce)
        elif self._fused_base():  # theta2 stays in the kernel's registers; theta_tilde is written
            retention = None if not fused_space else fused_retention.pass2(
                groups, self.space, den_sq, self._all_reduce, stepped=self._stepped_in_pass1(groups), c0=c0, c1=c1,
                min_effective_multiplier=self.min_effective_multiplier)
            sums = self.base.fused_step(groups, self._clip_coef(g1_norm), retention=retention,
                                        extrapolate={"K": self.K, "alpha": self.alpha, "delta": self.delta})
        else:
            g1_scale = 1.0 / self._clip(g1_norm)
            self.base.step()  # theta2
            sums = flat_ops.combine_stats(torch.stack([
                flat_ops.extrapolate(g, g.local_grads(), K=self.K, alpha=self.alpha, delta=self.delta,
                                     g1_scale=g1_scale).to(groups[0].device) for g in groups]))
        n_total = self._n_total(groups)
        sums = self._all_reduce(sums, with_max=True)  # read with pass 3's norms: one host read per pass
        self._rollback_before_corrective(saved_state)

        if self.skip_corrective:  # theta_tilde is the update
            sums = dict(zip(EXTRAP_STATS, sums.tolist(), strict=True))
            gt_norm = g0_gt = None
            metrics = pass1_metrics
        else:
            _, metrics = self._closure_pass(closure)  # at theta_tilde
            gt_norm, g0_gt, sums = self._read_with(self._grad_dots(groups, with_g0=True), sums)
            sums = dict(zip(EXTRAP_STATS, sums, strict=True))
            if not math.isfinite(gt_norm):
                self._restore_theta0_and_step_with_g0(groups, g0_norm, saved_state)
                return self._finish(loss, "nonfinite_gtilde", g0_norm=g0_norm)
            self._base_step(gt_norm)
        self.base.zero_grad(set_to_none=True)

        h = self._gate_statistic(metrics, g0_norm, g1_norm, gt_norm, g0_gt)
        gate = self._observe_gate(h, metrics if self.gate_stat == "entropy" else None)  # {} inside gate_batch()
        n_active, n_total = max(sums["n_active"], 1.0), max(n_total, 1.0)
        n_inactive = n_total - sums["n_active"]  # r = scale = 1 there
        r_mean = (sums["r_sum"] + n_inactive) / n_total
        corrective = {} if self.skip_corrective else {"gtilde_norm": gt_norm,
                                                       "cos_g0_gtilde": _cos(g0_gt, g0_norm, gt_norm)}
        stats = family_stats(  # over a Muon base: its families' statistics
            probe, sums, n_total, active=1.0, g0_norm=g0_norm, g1_norm=g1_norm, **corrective,
            cos_g0_g1=_cos(sums["g0_g1"], math.sqrt(sums["g0_sq"]), math.sqrt(sums["g1_sq"])),
            r_mean=r_mean, r_std=math.sqrt(max((sums["r_sq"] + n_inactive) / n_total - r_mean**2, 0.0)),
            scale_mean=(sums["scale_sum"] + n_inactive) / n_total, scale_max=sums["scale_max"],
            r_mean_active=sums["r_sum"] / n_active, scale_mean_active=sums["scale_sum"] / n_active,
            step_norm=math.sqrt(sums["d_sq"]), scaled_step_norm=math.sqrt(sums["scaled_d_sq"]),
            inactive_frac=n_inactive / n_total,
            ratio_clip_frac=sums["n_clipped"] / n_active, **gate,
        )
        return self._finish(loss, "none", **reposition_stats(
            stats, space=self.space, alpha=self.alpha, min_eff=self.min_effective_multiplier,
            n_tensors=len(self._had_grad), c0=c0, c1=c1))

    def _stepped_in_pass1(self, groups) -> list:
        """Per flat group, per tensor: pass 1 stepped it (it had a gradient, and lr > 0)."""
        lrs = {id(p): float(g["lr"]) for g in self.base.param_groups for p in g["params"]}
        return [[id(p) in self._had_grad and lrs[id(p)] > 0 for p in g.params] for g in groups]

    def _gate_statistic(self, metrics, g0_norm, g1_norm, gt_norm, g0_gt) -> float:
        """The value the gate observes for this active step (GATE_STATS); gt_norm None: no corrective pass."""
        if self.gate_stat == "entropy":
            return float(metrics.get("entropy_mean", math.nan))  # present unless gate == "never" (checked)
        if self.gate_stat == "g0":
            return g0_norm
        if self.gate_stat == "trajectory":
            return g1_norm if gt_norm is None else gt_norm
        if gt_norm is None:  # cosine with g~ = 0
            return 1.0
        return 1.0 - abs(g0_gt / (g0_norm * gt_norm + COSINE_EPS))


# The authors' repository at 1a301e1600b89e15ddc4978862bf8e543f3cf96e (Code/SFPO/experiments/gxpo_efficiency/):
# each launcher's values over common.sh's (trainer-side: lr 1e-6, AdamW weight decay 1e-2, grad clip 1.0,
# entropy coefficient 0.001, 64 prompts x 8 rollouts in mini-batches of 16 prompts; README "GXPO presets").
_AUTHORS_COMMON = {"tau": 3.0, "gate": "window_inclusive", "gate_stat": "entropy", "omega": 0.1, "window": 30,
                   "warmup": 50, "warmup_reset": True, "patience": 3, "optimizer_state": "transactional",
                   "retention_space": "auto", "max_active_steps": 0}
AUTHORS_PRESETS = {
    # qwen25_math_1p5b_gxpo_adamw_transactional_dir_k10.sh (K and alpha despite the name): their newest default
    "authors-1p5b": {**_AUTHORS_COMMON, "K": 3, "alpha": 0.8},
    # qwen25_math_1p5b_gxpo_k10.sh, the A/B baseline it names (GXPO_RETENTION_SPACE pinned to grad)
    "authors-1p5b-ab": {**_AUTHORS_COMMON, "K": 10, "alpha": 0.3, "retention_space": "grad"},
    # qwen25_math_7b_gxpo_b256_a03_k10.sh as of 7db2a1ee (K 5): tau 1.5, patience 2, no reset, 150 active steps
    "authors-7b": {**_AUTHORS_COMMON, "K": 5, "alpha": 0.3, "tau": 1.5, "patience": 2, "warmup_reset": False,
                   "max_active_steps": 150},
}


@dataclass
class GXPORuleConfig(LookaheadConfig):
    gate_stat: str | None = None  # what the gate observes: GATE_STATS
    skip_corrective: bool = False  # no pass 3: theta_tilde is the update (2 backward passes)
    retention_space: str | None = None  # RETENTION_SPACES (optim/retention_step.py)
    min_effective_multiplier: float = 0.0  # > 0: theta_tilde moves at least this fraction of theta2 - theta0

    name = "gxpo"
    rule = GXPO
    presets = {
        "paper": {"K": 5, "alpha": 0.5, "tau": 0.5, "gate": "ema", "gate_stat": "trajectory", "omega": 0.1,
                  "window": 30, "warmup": 0, "retention_space": "raw_grad"},
        "final": {"K": 3, "alpha": 0.5, "tau": 2.0, "gate": "window_inclusive", "gate_stat": "entropy",
                  "omega": 0.1, "window": 30, "warmup": 0, "retention_space": "raw_grad"},
        **AUTHORS_PRESETS,
    }
    default_preset = "authors-1p5b"
    min_K = 2

    def checks(self, cfg=None) -> list:
        return [*super().checks(), *([("gate_stat", self.gate_stat in GATE_STATS, f"one of {GATE_STATS}")]
                                     if self.preset in self.presets else []),
                ("skip_corrective", isinstance(self.skip_corrective, bool), "true or false"),
                *([("retention_space", self.retention_space in RETENTION_SPACES, f"one of {RETENTION_SPACES}")]
                  if self.preset in self.presets else []),
                ("min_effective_multiplier", self.min_effective_multiplier >= 0
                 and (self.min_effective_multiplier == 0 or self.retention_space != "raw_grad"),
                 ">= 0, and 0 with retention_space = 'raw_grad' (its kernels take no floor)")]

    @property
    def reads_batch_entropy(self) -> bool:
        return self.gate_stat == "entropy" and self.gate != "never"
