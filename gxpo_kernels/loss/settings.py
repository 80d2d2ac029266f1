"""The GRPO loss's settings and vocabulary, one home for the kernels, the autograd layer, the input checks and
the reference."""

from dataclasses import dataclass

# Rows of the per-token statistics buffer the kernels write ([len(STAT_NAMES), N]).
STAT_NAMES = ("loss", "logp", "ratio", "kl", "entropy", "clip_low", "clip_high", "clip_dual")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossParams:
    """The loss's scalar settings as the kernels take them (validated by inputs.make_config)."""

    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    beta: float = 0.0
    with_entropy: bool = False
    log_ratio_clamp: float | None = None  # verl's clamp of logp - old_logp before exp (their default: 20)

    @property
    def log_ratio_max(self) -> float:
        return float("inf") if self.log_ratio_clamp is None else self.log_ratio_clamp
