"""Sampling keyed by the row, not by a global RNG: each completion draws its tokens from a counter-based
hash of (row seed, token index), so a rollout does not depend on batch composition, padding or the
number of ranks. A 2-rank run samples the same completions as a 1-rank run."""

import torch

MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN, MIX1, MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (multiplication wraps mod 2^64)."""
    z = x + GOLDEN
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def row_seed(*parts: int) -> int:
    """One int64 seed from integers (run seed, step, prompt index, sample index, ...)."""
    z = torch.tensor(0, dtype=torch.int64)
    for p in parts:
        z = splitmix64(z ^ _signed(p & MASK64))
    return int(z)


def uniforms(seeds_B: torch.Tensor, t: int) -> torch.Tensor:
    """U(0, 1) per row for token index t, float64, never 0 or 1."""
    bits = splitmix64(splitmix64(seeds_B ^ t))
    return (_shr(bits, 11).double() + 0.5) * 2.0**-53


def sample_tokens(logits_BV: torch.Tensor, u_B: torch.Tensor, temperature: float, top_p: float) -> tuple:
    """Inverse-CDF sampling from softmax(logits / temperature) restricted to the top-p nucleus: (tokens [B], their
    log-probs [B] float64 under that distribution, the nucleus renormalized, as vLLM's processed log-probs)."""
    probs_BV = torch.softmax(logits_BV.double() / temperature, dim=-1)
    if top_p < 1.0:
        probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = probs_BV.cumsum(-1) - probs_BV
        probs_BV = torch.where(before_BV < top_p, probs_BV, 0.0)
    cdf_BV = probs_BV.cumsum(-1)
    target_B1 = (u_B * cdf_BV[:, -1]).unsqueeze(1)
    idx_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(1).clamp(max=probs_BV.shape[1] - 1)
    logp_B = torch.log(probs_BV.gather(1, idx_B[:, None]).squeeze(1) / cdf_BV[:, -1])
    return (order_BV.gather(1, idx_B[:, None]).squeeze(1) if top_p < 1.0 else idx_B), logp_B


class RowKeyedSampler:
    """A transformers LogitsProcessor that samples each row from its own key and returns logits with
    only the chosen token finite: run generate with do_sample=False and it picks that token. logps: the chosen
    tokens' log-probs, one [B] tensor per generated position."""

    def __init__(self, seeds_B: torch.Tensor, temperature: float, top_p: float):
        self.seeds_B, self.temperature, self.top_p = seeds_B, temperature, top_p
        self.t = 0
        self.logps = []

    def __call__(self, input_ids, scores_BV):
        u_B = uniforms(self.seeds_B.to(scores_BV.device), self.t)
        self.t += 1
        tokens_B, logp_B = sample_tokens(scores_BV, u_B, self.temperature, self.top_p)
        self.logps.append(logp_B)
        chosen = torch.full_like(scores_BV, float("-inf"))
        return chosen.scatter_(1, tokens_B[:, None], 0.0)
