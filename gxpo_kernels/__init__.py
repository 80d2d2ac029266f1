"""Triton kernels and update rules for GXPO, SFPO and GRPO."""

from .loss import fused_linear_grpo_loss, grpo_loss
from .optim import GRPO, GXPO, SFPO
from .optim.flat_adamw import FlatAdamW
from .optim.muon import Muon

__all__ = ["grpo_loss", "fused_linear_grpo_loss", "GRPO", "GXPO", "SFPO", "FlatAdamW", "Muon"]
__version__ = "0.1.0"
