"""GRPO-lambda: per-token advantages from eligibility traces (Parthasarathi et al. 2025, arXiv 2510.00194,
"GRPO-lambda: credit assignment improves LLM reasoning").

"recent" (the paper's default trace): token t of a completion of length L gets
    A_t = (gamma * lambda)^(L - 1 - t) * A,
so the credit decays from the last token backwards. "both" (the paper's exact formula is not public;
our reading): the larger of the backward trace and the forward trace (gamma * lambda)^t, so that the
first and the last tokens get full credit and the middle the least. Negative sequence advantages are
clamped at `neg_clamp` (-0.1 in the paper) before the trace is applied. Padding gets 0."""

from dataclasses import dataclass

import torch

from . import Plugin

TRACES = ("recent", "both")


@dataclass
class GRPOLambdaConfig:
    enabled: bool | None = None  # None: on under --recipe grpo-lambda
    lam: float = 0.99
    gamma: float = 1.0
    trace: str = "recent"  # | "both"
    neg_clamp: float | None = -0.1

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("lam", 0 < self.lam <= 1, "in (0, 1]"),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("trace", self.trace in ("recent", "both"), "'recent' or 'both'"),
        ]

    def resolve(self, recipe_on: bool):
        if self.enabled is None:
            self.enabled = recipe_on


def trace_weights(mask_BT: torch.Tensor, lam: float, gamma: float, trace: str) -> torch.Tensor:
    """[B, T] weights in (0, 1] on completion tokens (mask: a prefix of each row), 0 on padding."""
    if trace not in TRACES:
        raise ValueError(f"grpo_lambda.trace must be one of {TRACES}, got {trace!r}")
    if not 0 < lam <= 1 or not 0 < gamma <= 1:
        raise ValueError(f"grpo_lambda needs 0 < lambda <= 1 and 0 < gamma <= 1, got {lam}, {gamma}")
    lengths_B1 = mask_BT.sum(1, keepdim=True)
    t_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device)[None].expand_as(mask_BT)
    decay = gamma * lam
    weights = decay ** (lengths_B1 - 1 - t_BT).clamp(min=0).double()
    if trace == "both":
        weights = torch.maximum(weights, decay ** t_BT.double())
    return torch.where(mask_BT, weights, 0.0)


def grpo_lambda_advantages(adv_B: torch.Tensor, mask_BT: torch.Tensor, lam: float = 0.99, gamma: float = 1.0,
                           trace: str = "recent", neg_clamp: float | None = -0.1) -> torch.Tensor:
    """[B, T] per-token advantages for grpo_loss from sequence advantages [B]."""
    adv_B = adv_B.clamp(min=neg_clamp) if neg_clamp is not None else adv_B
    return (trace_weights(mask_BT, lam, gamma, trace) * adv_B.double()[:, None]).to(adv_B.dtype)


def trace_advantages(trainer, got, adv):
    """The advantages slot: [B] sequence advantages become [B, T] per-token ones."""
    g, mask = trainer.cfg.grpo_lambda, got.batch.completion_mask
    return grpo_lambda_advantages(adv.to(mask.device), mask, g.lam, g.gamma, g.trace, g.neg_clamp), {}


PLUGIN = Plugin("grpo_lambda", "grpo-lambda", enabled=lambda cfg: cfg.grpo_lambda.enabled, advantages=trace_advantages)
