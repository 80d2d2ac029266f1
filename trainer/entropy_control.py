"""Adaptive entropy control (loss.use_adaptive_entropy, loss.objective = "policy"): Skywork-OR1's coefficient
as TRL 1.16 steps it, once per trainer step, checkpointed with the run so a resume continues it exactly."""

import math

import torch

from gxpo_kernels.loss.objectives import adapted_entropy_coef


class AdaptiveEntropy:
    """coef starts at objective.entropy_coef; each step the batch's token-mean entropy over all ranks moves it by
    loss.entropy_coef_delta (up at or below loss.entropy_target, down above it) within [entropy_coef_min,
    entropy_coef_max]. The bonus applies only while the last step's entropy was at or below the target."""

    def __init__(self, loss_cfg, start_coef: float):
        self.loss_cfg, self.coef, self.last_entropy = loss_cfg, float(start_coef), math.inf

    def applied(self) -> float:
        """The bonus's coefficient for the next step."""
        return self.coef if self.last_entropy <= self.loss_cfg.entropy_target else 0.0

    def step(self, world_entropy: float):
        c = self.loss_cfg
        self.coef = adapted_entropy_coef(self.coef, world_entropy, c.entropy_target, c.entropy_coef_delta,
                                         c.entropy_coef_min, c.entropy_coef_max)
        self.last_entropy = world_entropy

    def state_dict(self) -> dict:
        return {"coef": torch.tensor(self.coef, dtype=torch.float64),
                "last_entropy": torch.tensor(self.last_entropy, dtype=torch.float64)}

    def load_state_dict(self, state: dict):
        self.coef, self.last_entropy = float(state["coef"]), float(state["last_entropy"])
