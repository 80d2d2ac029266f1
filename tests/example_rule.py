"""An update rule written the way a new one is added: this file, and one registry line
(`register(SignRuleConfig)` in gxpo_kernels/optim/__init__.py; the tests register it for their run).
SignGRPO: one pass, the gradient replaced by scale * sign(gradient), one base step."""

from dataclasses import dataclass

import torch

from gxpo_kernels.optim.config import RuleConfig
from gxpo_kernels.optim.rule import UpdateRule


class SignGRPO(UpdateRule):
    def __init__(self, params, base=torch.optim.SGD, config=None, *, max_grad_norm=None, allow_bf16_params=False,
                 **kwargs):
        self.config, base_kwargs = SignRuleConfig.split(config, kwargs)
        super().__init__(params, base, base_kwargs, max_grad_norm=max_grad_norm, allow_bf16_params=allow_bf16_params)

    def step(self, closure=None):
        self._start_step(closure)
        loss, _ = self._closure_pass(closure)
        for p in self._params():
            if p.grad is not None:
                p.grad.copy_(self.config.scale * p.grad.sign())
        self.base.step()
        self.base.zero_grad(set_to_none=True)
        self.last_grad_norm = 0.0
        return loss


@dataclass
class SignRuleConfig(RuleConfig):
    scale: float = 1.0  # the step's gradient is scale * sign(g)

    name = "sign"
    rule = SignGRPO

    def checks(self, cfg=None) -> list:
        return [("scale", self.scale > 0, "> 0")]
