"""The update-rule interface every rule (GRPO, SFPO, GXPO) implements: step(closure) calls the closure
as often as the rule needs, drives a base optimizer, counts backward passes, and checkpoints through its
own state."""

import contextlib

import torch

from .flat_adamw import FlatAdamW
from .precision import check_master_dtype


def run_closure(closure):
    """(loss, metrics): the closure may return a loss or (loss, metrics dict)."""
    with torch.enable_grad():
        out = closure()
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else {})
    return out, {}


class UpdateRule(torch.optim.Optimizer):
    """step(closure) calls the closure as often as the rule needs; the closure computes the loss on
    the fixed batch and calls backward (gradients are zeroed by the rule before each call).

    base: a torch.optim.Optimizer class (built here on params with base_kwargs) or instance. The rule
    shares the base's param_groups, so an LR scheduler on the rule schedules the base. After a step,
    last_grad_norm is the pre-clip norm of the step's first gradient and last_stats the rule's
    diagnostics."""

    def __init__(self, params, base, base_kwargs, *, max_grad_norm, allow_bf16_params=False):
        params = list(params)
        if isinstance(base, type) and issubclass(base, FlatAdamW):
            base_kwargs = {**base_kwargs, "allow_bf16_params": allow_bf16_params}
        if isinstance(base, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"base is an already-built optimizer; pass {sorted(base_kwargs)} to it, not here")
            self.base = base
        elif isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
            self.base = base(params, **base_kwargs)
        else:
            raise ValueError(f"base must be a torch.optim.Optimizer class or instance, got {base!r}")
        base_params = [p for g in self.base.param_groups for p in g["params"]]
        check_master_dtype(base_params, self.base, allow_bf16_params)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        super().__init__(base_params, {})
        self.param_groups = self.base.param_groups
        self.defaults = self.base.defaults
        self.max_grad_norm = max_grad_norm
        self.backward_passes = 0
        self.steps = 0
        self.last_stats = {}
        self.last_grad_norm = float("nan")

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _start_step(self, closure):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that computes the loss on the batch "
                             "and calls backward")
        self.steps += 1

    def _closure_pass(self, closure):
        self.base.zero_grad(set_to_none=True)
        loss, metrics = run_closure(closure)
        self.backward_passes += 1
        return loss, metrics

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    # -- several steps, one gate observation -------------------------------------------------------
    @contextlib.contextmanager
    def gate_batch(self):
        """`with rule.gate_batch(): rule.step(c1); rule.step(c2); ...`: the steps inside are one observation of
        the rule's gate (PPO mini-batches of one rollout batch, observed once per batch as the GXPO authors'
        trainer does; LookaheadRule). A rule without a gate (GRPO) just steps. An exception inside drops the
        batch's observation."""
        self.begin_gate_batch()
        try:
            yield self
        except BaseException:
            self.abort_gate_batch()
            raise
        self.end_gate_batch()

    def begin_gate_batch(self):
        """The steps from here to end_gate_batch() make one gate observation (gate_batch() pairs them)."""

    def end_gate_batch(self):
        """The gate observes the batch begun by begin_gate_batch()."""

    def abort_gate_batch(self):
        """Leave the batch begun by begin_gate_batch() without observing it."""

    @property
    def in_gate_batch(self) -> bool:
        """Between begin_gate_batch() and end_gate_batch() (restored by load_state_dict)."""
        return False

    # -- checkpointing -----------------------------------------------------------------------------
    def own_state_dict(self) -> dict:
        """The rule's state beyond its base optimizer's (counters; the gate in SFPO / GXPO)."""
        return {"backward_passes": self.backward_passes, "steps": self.steps}

    def load_own_state_dict(self, state: dict):
        self.backward_passes = state["backward_passes"]
        self.steps = state["steps"]

    def state_dict(self):
        return {"base": self.base.state_dict(), **self.own_state_dict()}

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict["base"])
        self.load_own_state_dict(state_dict)

    def sharded_state_dict(self, model) -> dict:
        """{"model", "optim", "rule"} for torch.distributed.checkpoint: model and base-optimizer state keyed
        by parameter name (sharded as the model is, so a run resumes on another number of ranks), and
        own_state_dict()."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, self.base)
        return {"model": model_sd, "optim": optim_sd, "rule": self.own_state_dict()}

    def load_sharded_state_dict(self, model, state: dict):
        """Loads what sharded_state_dict returned (after dcp.load filled it in) into model and rule."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, self.base, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.load_own_state_dict(state["rule"])
