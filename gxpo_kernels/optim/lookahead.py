"""What SFPO and GXPO share beyond UpdateRule: the flat theta0 / g0 state, the gate, snapshots and
restores, optimizer-state transactions and the fallback to one plain step."""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import RuleConfig
from .flat import ops as flat_ops
from .flat.buffers import BLOCK, DTensor, GroupCache, local
from .flat.extrapolation import DELTA
from .flat_adamw import FlatAdamW
from .gate import ZScoreGate, gate_checks, int_at_least
from .rule import UpdateRule

# accumulate: the base optimizer's moments and step count advance on every pass and stay so on a fallback;
# transactional (the GXPO authors' default): restored to their pre-step value before the corrective step,
# so they advance once per update; transactional_fast_state (theirs too): kept through the corrective step
# (+3 per update) but restored with theta0 when a pass fails (github SwapniL-afk-now/final-gxpo 1a301e16,
# Code/SFPO/verl/workers/actor/optimizer_transaction.py and dp_actor.py).
OPTIMIZER_STATES = ("accumulate", "transactional", "transactional_fast_state")
FALLBACK_CODES = {"none": 0.0, "nonfinite_g0": 1.0, "tiny_g0": 2.0, "nonfinite_g1": 3.0, "nonfinite_gtilde": 4.0}
# A closure's metrics key: the number of tokens (over all ranks) its "entropy_mean" averages over. Inside
# gate_batch() it weights each step's entropy in the batch's one observation, so that the gate sees the token mean
# over the whole batch (the GXPO authors' update_policy_gxpo reduces its mini-batches' corrective-pass entropies
# so); without it the steps weigh equally.
ENTROPY_TOKENS = "entropy_tokens"


@dataclass
class LookaheadConfig(RuleConfig):
    """SFPO's and GXPO's shared knobs. The fields left None take the preset's value (each rule's `presets`)."""

    preset: str | None = None  # None: the rule's default preset
    K: int | None = None  # fast steps (GXPO: the virtual K-step point it extrapolates to)
    alpha: float | None = None  # the partial move from theta0 toward the extrapolated point
    tau: float | None = None  # the gate's z-score threshold
    gate: str | None = None  # ema | ema_onesided | window | window_inclusive | never (optim/gate.py)
    omega: float | None = None  # the EMA gates' weight
    window: int | None = None  # the window gates' length
    warmup: int | None = None  # first steps the gate cannot close
    warmup_reset: bool | None = None  # window gates: the history restarts after warm-up (optim/gate.py)
    robust: bool = False  # gate "window": median / MAD in place of mean / std
    patience: int | None = None  # consecutive violations that trip it
    fallback: str = "permanent"  # | "temporary": closed for fallback_window steps, then reopened
    fallback_window: int = 10
    optimizer_state: str | None = None  # OPTIMIZER_STATES
    max_active_steps: int | None = None  # > 0: the steps after the first max_active_steps are plain ones
    delta: float = DELTA  # the retention ratio's denominator guard

    min_K = 1
    # what a preset that does not name them takes
    preset_base = {"patience": 1, "optimizer_state": "accumulate", "warmup_reset": True, "max_active_steps": 0}

    def resolved(self) -> "LookaheadConfig":
        config = super().resolved()
        if config.preset not in self.presets:
            return config
        return dataclasses.replace(config, **{k: v for k, v in self.preset_base.items() if getattr(config, k) is None})

    def checks(self, cfg=None) -> list:
        if self.preset not in self.presets:
            return super().checks()
        return [*super().checks(),
                ("K", int_at_least(self.K, self.min_K), f"an int >= {self.min_K}"),
                ("alpha", 0 < self.alpha <= 1, "in (0, 1]"),
                *gate_checks(self.gate, self.tau, self.omega, self.window, self.patience, self.fallback,
                             self.fallback_window, self.warmup, self.warmup_reset, self.robust),
                ("optimizer_state", self.optimizer_state in OPTIMIZER_STATES, f"one of {OPTIMIZER_STATES}"),
                ("max_active_steps", int_at_least(self.max_active_steps, 0), "an int >= 0 (0: no budget)"),
                ("delta", self.delta > 0, "> 0")]

    def make_gate(self) -> ZScoreGate:
        return ZScoreGate(self.gate, self.tau, self.omega, self.window, self.patience, self.fallback,
                          self.fallback_window, self.warmup, self.warmup_reset, self.robust)


class LookaheadRule(UpdateRule):
    """The base of SFPO and GXPO: fast steps from a snapshot theta0 / g0 held in flat buffers, a
    z-score gate that falls back to one plain (GRPO) step per call once it trips, and the base
    optimizer's moments accumulated or restored around the fast steps (optimizer_state)."""

    def __init__(self, params, base, base_kwargs, *, config: LookaheadConfig, max_grad_norm, allow_bf16_params=False):
        super().__init__(params, base, base_kwargs, max_grad_norm=max_grad_norm, allow_bf16_params=allow_bf16_params)
        self.config = config
        self.gate = config.make_gate()
        self.optimizer_state, self.max_active_steps = config.optimizer_state, config.max_active_steps
        self.preset, self.K, self.alpha, self.delta = config.preset, config.K, config.alpha, config.delta
        self.budget_spent = False  # max_active_steps closed the gate
        self.gate_steps = 0  # steps as the gate counts them (max_active_steps, fallback_window): one per step, or
        # one per gate_batch()
        self._gate_batch = None  # inside gate_batch(): its active steps' (statistic, weight); None outside
        self._cache = GroupCache(BLOCK)
        if isinstance(self.base, FlatAdamW):  # one set of flat groups: shared tables, no second theta0 / g0
            self.base._cache = self._cache

    @property
    def active(self) -> bool:
        return self.gate.open

    # -- pieces ------------------------------------------------------------------------------------
    def _flat_groups(self):
        return self._cache.get(self._params())

    def _sharded(self):
        return dist.is_available() and dist.is_initialized() and any(isinstance(p, DTensor) for p in self._params())

    def _all_reduce(self, vec: torch.Tensor, with_max=False) -> torch.Tensor:
        """Sum a small float64 vector over ranks (FSDP2 local shards); with_max: it starts with the
        EXTRAP_STATS sums, whose scale_max entry takes the max."""
        if not self._sharded():
            return vec
        rows = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, vec.contiguous())
        rows = torch.stack(rows)
        return flat_ops.combine_stats(rows) if with_max else rows.sum(0)

    def _check_entropy(self, metrics):
        """The gate reads the batch token entropy from the closure's metrics: fail on the first pass, before
        any step, when they do not carry it."""
        if self.gate.kind != "never" and "entropy_mean" not in metrics:
            raise ValueError(f"{type(self).__name__}'s gate reads the batch token entropy: return "
                             "(loss, {'entropy_mean': H}) from the closure (grpo_loss(..., return_entropy=True) "
                             "gives it), or choose gate='never' or another gate statistic")

    def _grad_dots(self, groups, with_g0=False) -> torch.Tensor:
        """[||g||^2, <g0, g>] over all ranks, of the current gradients before clipping, on the device."""
        return self._all_reduce(sum(flat_ops.grad_dots(g, g.local_grads(), with_g0) for g in groups))

    def _grad_norm(self, groups, with_g0=False):
        """(||g||, <g0, g>): one host read."""
        dots = self._grad_dots(groups, with_g0).tolist()
        return math.sqrt(dots[0]), dots[1]

    def _read_with(self, dots: torch.Tensor, extra: torch.Tensor) -> tuple:
        """(||g||, <g0, g>, extra as floats) in one host read."""
        values = torch.cat([dots.double(), extra.to(dots.device, torch.float64).reshape(-1)]).tolist()
        return math.sqrt(values[0]), values[1], values[2:]

    def _n_total(self, groups) -> float:
        """Coordinates over all ranks; counted (one all-reduce) once per parameter set."""
        if getattr(self, "_n_total_of", None) is not self._cache.groups:
            local_n = sum(g.total for g in groups)
            if self._sharded():
                vec = torch.tensor([float(local_n)], dtype=torch.float64, device=groups[0].device)
                local_n = self._all_reduce(vec).item()
            self._n_total_of, self._n_total_value = self._cache.groups, float(local_n)
        return self._n_total_value

    def _clip_coef(self, norm: float) -> float:
        if self.max_grad_norm is None or norm <= self.max_grad_norm:
            return 1.0
        return self.max_grad_norm / (norm + 1e-6)

    def _clip(self, norm: float) -> float:
        """Scale gradients in place so that their norm is at most max_grad_norm; returns the factor."""
        coef = self._clip_coef(norm)
        if coef == 1.0:
            return 1.0
        grads = [local(p.grad) for p in self._params() if p.grad is not None]
        torch._foreach_mul_(grads, coef)
        return coef

    def _base_step(self, norm: float):
        self._clip(norm)
        self.base.step()

    def _closed_gate_step(self, closure):
        """Start a step: check the closure and count it; while the gate is closed, take one plain step
        and return its loss (None while the gate is open)."""
        self._start_step(closure)
        if self._gate_batch is None:  # a gate batch counts once, when it begins
            self._count_gate_step()
        if self.gate.open:
            return None
        loss, _, norm = self._plain_step(closure)
        if self._gate_batch is None:
            self.gate.tick_closed()
        self._finish(loss, "none", active=0.0, g0_norm=norm)
        return loss

    def _count_gate_step(self):
        self.gate_steps += 1
        if self.max_active_steps and self.gate_steps > self.max_active_steps and self.gate.open:
            self.gate.close_for_good()
            self.budget_spent = True

    def _observe_gate(self, h: float, metrics=None) -> dict:
        """The gate observes this active step's statistic h; returns {"z", "gate_stat"} for last_stats. Inside
        gate_batch() h is kept for the batch's one observation instead (weighted by metrics[ENTROPY_TOKENS] when
        h is the entropy mean of these metrics, else 1) and {} is returned."""
        if self._gate_batch is None:
            return {"z": self.gate.observe(h), "gate_stat": h}
        weight = 1.0 if metrics is None else float(metrics.get(ENTROPY_TOKENS, 1.0))
        self._gate_batch.append((float(h), weight))
        return {}

    # -- several steps, one gate observation (UpdateRule.gate_batch) ------------------------------------------
    @property
    def in_gate_batch(self) -> bool:
        return self._gate_batch is not None

    def begin_gate_batch(self):
        """The steps until end_gate_batch() are one gate step: max_active_steps counts it here, its steps keep
        their statistics, and the gate neither observes nor (closed) ticks until it ends; so the gate is open or
        closed for the whole batch."""
        if self._gate_batch is not None:
            raise RuntimeError(f"{type(self).__name__}.begin_gate_batch: a gate batch is already open")
        self._count_gate_step()
        self._gate_batch = []

    def end_gate_batch(self):
        """One observation for the batch: the weighted mean of its active steps' statistics (none active: no
        observation); last_stats gets its z and gate_stat. A batch taken closed ticks a temporary fallback once."""
        kept, self._gate_batch = self._gate_batch, None
        if kept is None:
            raise RuntimeError(f"{type(self).__name__}.end_gate_batch without begin_gate_batch")
        if not self.gate.open:
            self.gate.tick_closed()  # a temporary fallback may reopen here
            self.last_stats["gate_open"] = float(self.gate.open)
            return
        if not kept:
            return
        total = sum(w for _, w in kept)
        h = kept[0][0] if len(kept) == 1 else (sum(v * w for v, w in kept) / total if total > 0
                                                else sum(v for v, _ in kept) / len(kept))
        z = self.gate.observe(h)
        self.last_stats.update(z=z, gate_stat=h, gate_open=float(self.gate.open))

    def abort_gate_batch(self):
        self._gate_batch = None

    def _finish(self, loss, reason, **stats):
        self.last_stats = {"active": stats.pop("active", 0.0), "fallback": FALLBACK_CODES[reason], **stats,
                           "gate_open": float(self.gate.open), "backward_passes": float(self.backward_passes)}
        if self.max_active_steps:
            self.last_stats["budget_spent"] = float(self.budget_spent)
        self.last_grad_norm = self.last_stats.get("g0_norm", float("nan"))
        return loss

    def _plain_step(self, closure):
        """One GRPO step: one pass, clip, base step."""
        loss, metrics = self._closure_pass(closure)
        norm, _ = self._grad_norm(self._flat_groups())
        if math.isfinite(norm):
            self._base_step(norm)
        self.base.zero_grad(set_to_none=True)
        return loss, metrics, norm

    def _fused_base(self) -> bool:
        """The base optimizer can write the pass-1 snapshot inside its own step (FlatAdamW on Triton)."""
        return isinstance(self.base, FlatAdamW) and self.base.uses_kernel()

    def _snapshot(self, groups) -> float:
        """theta0 and g0 into the flat buffers; returns ||g0|| over all ranks. With a fused base the
        buffers are written later, by _first_step's AdamW pass, and only the norm is read here."""
        self._had_grad = {id(p) for p in self._params() if p.grad is not None}
        if self._fused_base():
            return self._grad_norm(groups)[0]
        g0_sq = sum(flat_ops.snapshot(g, g.local_grads()) for g in groups)
        return math.sqrt(self._all_reduce(g0_sq.reshape(1)).item())

    def _first_step(self, groups, g0_norm: float):
        """theta1: the clipped base step from theta0 (writing the snapshot too when the base is fused)."""
        if self._fused_base():
            self.base.step(grad_scale=self._clip_coef(g0_norm), snapshot_groups=groups)
        else:
            self._base_step(g0_norm)

    def _restore_theta0_and_step_with_g0(self, groups, g0_norm, saved_state):
        """Back to theta0 (and, unless accumulating, the base optimizer's pre-step state), then one plain step
        with the cached g0: the fallback for a non-finite pass."""
        self._load_optimizer_state(saved_state)
        self.base.zero_grad(set_to_none=True)
        for g in groups:
            flat_ops.restore(g)
            for j, p in enumerate(g.params):
                if id(p) not in self._had_grad:
                    continue
                grad = g.view(g.g0, j).clone()
                if isinstance(p, DTensor):
                    grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                p.grad = grad
        self._base_step(g0_norm)
        self.base.zero_grad(set_to_none=True)

    def _rollback_before_corrective(self, saved):
        if self.optimizer_state == "transactional":
            self._load_optimizer_state(saved)

    def _save_optimizer_state(self):
        if self.optimizer_state == "accumulate":
            return None
        return {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                for p, s in self.base.state.items()}

    def _load_optimizer_state(self, saved):
        """The saved state back in place (idempotent); None (accumulate) leaves it."""
        if saved is None:
            return
        for p in list(self.base.state):
            if p not in saved:
                del self.base.state[p]
        for p, s in saved.items():
            live = self.base.state[p]
            for k, v in s.items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                    live[k].copy_(v)
                else:
                    live[k] = v

    # -- checkpointing -----------------------------------------------------------------------------
    def own_state_dict(self) -> dict:
        return {**super().own_state_dict(), "gate": self.gate.state_dict(), "budget_spent": self.budget_spent,
                "gate_steps": self.gate_steps,
                "gate_batch": None if self._gate_batch is None else [list(e) for e in self._gate_batch]}

    def load_own_state_dict(self, state: dict):
        super().load_own_state_dict(state)
        self.gate.load_state_dict(state["gate"])
        self.budget_spent = state.get("budget_spent", False)
        self.gate_steps = state.get("gate_steps", self.steps)  # checkpoints before gate batches: one per step
        batch = state.get("gate_batch")
        self._gate_batch = None if batch is None else [(float(h), float(w)) for h, w in batch]
