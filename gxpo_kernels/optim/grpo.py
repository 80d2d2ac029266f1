"""GRPO as an update rule: one pass, clip, one base step (UpdateRule, optim/rule.py, as SFPO and GXPO)."""

import math
from dataclasses import dataclass

import torch

from .config import RuleConfig
from .rule import UpdateRule


class GRPO(UpdateRule):
    """opt = GRPO(model.parameters(), base=torch.optim.AdamW, max_grad_norm=1.0, lr=1e-6); opt.step(closure).

    One closure call per step; the gradients are clipped with torch.nn.utils.clip_grad_norm_ (as TRL
    and verl clip, FSDP2 DTensors included) and the base optimizer steps unless their norm is not
    finite. last_grad_norm is the pre-clip norm; gradients are cleared after the step."""

    def __init__(self, params, base=torch.optim.AdamW, config=None, *, max_grad_norm=None, allow_bf16_params=False,
                 **kwargs):
        self.config, base_kwargs = GRPORuleConfig.split(config, kwargs)
        super().__init__(params, base, base_kwargs, max_grad_norm=max_grad_norm, allow_bf16_params=allow_bf16_params)

    def step(self, closure=None):
        self._start_step(closure)
        loss, _ = self._closure_pass(closure)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._params(), max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            self.base.step()
        self.base.zero_grad(set_to_none=True)
        self.last_grad_norm = norm
        return loss


@dataclass
class GRPORuleConfig(RuleConfig):
    """GRPO has no knobs of its own (clipping and the base optimizer are every rule's)."""

    name = "grpo"
    rule = GRPO
