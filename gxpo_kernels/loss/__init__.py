"""The GRPO-family policy loss: public functions (functions.py), input checks (inputs.py), settings (settings.py),
the per-token objective on [n] vectors (objective.py), the loss from logits (logits_kernels.py, rows.py,
logits_autograd.py), the loss fused with the LM head (lm_head_kernels.py, lm_head_autograd.py, lm_head_cost.py),
and the tests' float64 oracle (reference.py)."""

from .functions import fused_linear_grpo_loss, grpo_loss

__all__ = ["fused_linear_grpo_loss", "grpo_loss"]
