"""The GRPO loss's vocabulary, one home for the kernels, the autograd layer, input checks and the reference."""

# Rows of the per-token statistics buffer the kernels write ([len(STAT_NAMES), N]).
STAT_NAMES = ("loss", "logp", "ratio", "kl", "entropy", "clip_low", "clip_high", "clip_dual")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
