"""The GRPO-family policy loss: public functions (functions.py), input checks (inputs.py), settings (settings.py),
the per-token GRPO math on [n] vectors (grpo_terms.py), the vocabulary primitive (vocab.py) and
the objectives on its [B, T] vectors (objectives.py), the loss from logits (logits_kernels.py, rows.py,
logits_autograd.py), the loss fused with the LM head (lm_head_kernels.py, lm_head_autograd.py, lm_head_cost.py),
and the tests' float64 oracle (reference.py)."""

from .functions import fused_linear_grpo_loss, fused_linear_token_logprobs, grpo_loss, token_logprobs
from .objectives import PolicyObjective, policy_loss

__all__ = ["PolicyObjective", "fused_linear_grpo_loss", "fused_linear_token_logprobs", "grpo_loss", "policy_loss",
           "token_logprobs"]
