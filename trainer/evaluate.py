"""Held-out evaluation: pass@1 averaged over n samples per problem, and pass@k (the unbiased estimator
of Chen et al. 2021: 1 - C(n - c, k) / C(n, k) for c correct out of n)."""

from math import comb

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@torch.no_grad()
def evaluate(engine, prompts: list, answers: list, reward_fn, n_samples: int, k: int) -> dict:
    """Sample n_samples completions per held-out prompt with the rollout engine and score them."""
    batch = engine.generate(prompts, n_samples)
    golds = [a for a in answers for _ in range(n_samples)]
    correct = torch.tensor([reward_fn(t, g) >= 1 for t, g in zip(batch.texts, golds, strict=True)])
    per_problem = correct.view(len(prompts), n_samples).sum(1).tolist()
    return {
        "eval/pass@1": sum(c / n_samples for c in per_problem) / len(prompts),
        f"eval/pass@{k}": sum(pass_at_k(n_samples, c, k) for c in per_problem) / len(prompts),
    }
