"""FlatAdamW: torch.optim.AdamW whose step is one Triton launch per (device, dtype) group (CUDA, or the
interpreter in tests), with the same state_dict; elsewhere it is torch's AdamW. As GXPO's base
optimizer it also takes the pass-1 snapshot inside the AdamW pass (gxpo_kernels/optim/flat/adamw_kernel.py)."""

import math

import torch

from .. import backend
from .flat.adamw_kernel import adamw_step
from .flat.buffers import BLOCK, GroupCache, local
from .flat.ops import combine_stats
from .precision import check_master_dtype


def advance_adamw_state(state: dict, p: torch.Tensor) -> float:
    """torch AdamW's per-parameter state (step, exp_avg, exp_avg_sq), created where empty, its step counted up;
    returns the new step count (FlatAdamW and Muon's AdamW branch keep the same state_dict as torch's AdamW)."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    return float(state["step"])


class FlatAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, allow_bf16_params=False,
                 **kwargs):
        for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
            if kwargs.get(flag):
                raise ValueError(f"FlatAdamW does not support {flag}=True; use torch.optim.AdamW")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        check_master_dtype(self._params(), self, allow_bf16_params)
        self._cache = GroupCache(BLOCK)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def flat_groups(self):
        return self._cache.get(self._params())

    def uses_kernel(self) -> bool:
        params = self._params()
        return bool(params) and backend.use_triton(local(params[0]))

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0, snapshot_groups=None):
        """One AdamW step with gradients scaled by grad_scale (a clip coefficient, without touching the
        gradients). snapshot_groups: flat groups over the same parameters (GXPO's) whose theta0 and g0
        are written in the same pass."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.uses_kernel():
            if snapshot_groups is not None:
                raise ValueError("the fused snapshot needs the Triton path (CUDA)")
            if grad_scale != 1.0:
                torch._foreach_mul_([p.grad for p in self._params() if p.grad is not None], grad_scale)
            super().step()
            return loss
        self.fused_step(snapshot_groups or self.flat_groups(), grad_scale, snapshot=snapshot_groups is not None)
        return loss

    @torch.no_grad()
    def fused_step(self, groups, grad_scale: float = 1.0, snapshot: bool = False, extrapolate=None, retention=None):
        """The kernel step over `groups` (flat groups of this optimizer's parameters); with extrapolate
        ({"K", "alpha", "delta"}) GXPO's pass 2: returns the EXTRAP_STATS sums over the groups. retention: one
        adamw_kernel.Retention per group (the authors' current spaces); with snapshot it returns each group's
        per-tensor sums of squares of the ratio's denominator."""
        hyper = {id(p): g for g in self.param_groups for p in g["params"]}
        sums, den_sq = None, []
        for gi, group in enumerate(groups):
            grads, ms, vs, lr, wd, bc1, bc2_sqrt, bc1_prev, bc2_sqrt_prev = [], [], [], [], [], [], [], [], []
            for p in group.params:
                h = hyper[id(p)]
                state = self.state[p]
                if p.grad is None:
                    grads.append(None), ms.append(None), vs.append(None)
                    lr.append(0.0), wd.append(0.0), bc1.append(1.0), bc2_sqrt.append(1.0)
                    bc1_prev.append(1.0), bc2_sqrt_prev.append(1.0)
                    continue
                step = advance_adamw_state(state, p)
                beta1, beta2 = h["betas"]
                grads.append(local(p.grad)), ms.append(local(state["exp_avg"])), vs.append(local(state["exp_avg_sq"]))
                lr.append(float(h["lr"])), wd.append(float(h["weight_decay"]))
                bc1.append(1 - beta1**step), bc2_sqrt.append(math.sqrt(1 - beta2**step))
                prev = step - 1  # the moments as this step found them (0: none yet, d0 = 0 / (0 + eps))
                bc1_prev.append(1 - beta1**prev if prev else 1.0)
                bc2_sqrt_prev.append(math.sqrt(1 - beta2**prev) if prev else 1.0)
            betas = {tuple(hyper[id(p)]["betas"]) for p in group.params}
            eps = {hyper[id(p)]["eps"] for p in group.params}
            if len(betas) > 1 or len(eps) > 1:
                raise ValueError("FlatAdamW's fused step needs one betas and eps per device/dtype group")
            (beta1, beta2), = betas
            out = adamw_step(group, grads, ms, vs, lr, wd, bc1, bc2_sqrt, beta1=beta1, beta2=beta2, eps=eps.pop(),
                             grad_scale=grad_scale, snapshot=snapshot, extrapolate=extrapolate,
                             retention=None if retention is None else retention[gi], bc1_prev=bc1_prev,
                             bc2_sqrt_prev=bc2_sqrt_prev)
            if snapshot and retention is not None:
                den_sq.append(out)
            elif out is not None:
                sums = out if sums is None else combine_stats(torch.stack([sums, out]))
        return den_sq if (snapshot and retention is not None) else sums
