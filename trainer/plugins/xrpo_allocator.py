"""XRPO rollout allocation (Bamba et al. 2025, arXiv 2510.06672). After n0 rollouts per prompt, the half-
width of the 95% confidence interval of prompt q's mean reward is h_q(n) = t_{0.975, n-1} * s_q /
sqrt(n) (Student t, s_q the sample std of its rewards so far). One more rollout gains h_q(n_q) - h_q(n_q
+ 1) (s_q held fixed); the exploration bonus is lambda * sqrt(log(1 + T) / n_q), T the training step
(the trainer counts it from 1: xrpo.bonus_step). The remaining budget is handed out greedily by gain +
bonus, one rollout at a time, over a few phases (rewards observed in one phase update s_q for the next).
Zero-variance groups gain nothing but keep the bonus. Ties go to the lower prompt index."""

import math

# t_{0.975, df} for df = 1..10; beyond, the Cornish-Fisher expansion (error < 1e-3 for df > 10)
T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281]
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"the Student t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def half_width(std: float, n: int) -> float:
    return t_quantile_975(n - 1) * std / math.sqrt(n)


def sample_std(rewards: list) -> float:
    n = len(rewards)
    mean = sum(rewards) / n
    return math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))


def priority(rewards: list, n: int, step: int, bonus: float) -> float:
    """gain of one more rollout for a prompt with `rewards` observed and n allocated, plus the bonus."""
    std = sample_std(rewards)
    return half_width(std, n) - half_width(std, n + 1) + bonus * math.sqrt(math.log(1 + step) / n)


def allocate(rewards_per_prompt: list, allocated: list, budget: int, step: int, bonus: float) -> list:
    """Extra rollouts per prompt (summing exactly to budget), greedily by priority; `allocated` is how
    many each prompt has so far (>= 2), rewards_per_prompt what was observed of them."""
    if budget < 0:
        raise ValueError(f"rollout budget must be >= 0, got {budget}")
    if any(n < 2 for n in allocated):
        raise ValueError("XRPO allocation needs at least 2 rollouts per prompt first (xrpo.n0 >= 2)")
    extra = [0] * len(allocated)
    for _ in range(budget):
        scores = [priority(r, n + e, step, bonus) for r, n, e in zip(rewards_per_prompt, allocated, extra,
                                                                     strict=True)]
        extra[max(range(len(scores)), key=lambda i: (scores[i], -i))] += 1
    return extra


def phase_budgets(total: int, phases: int) -> list:
    """total split over phases as evenly as possible, earlier phases first."""
    return [total // phases + (1 if i < total % phases else 0) for i in range(phases)]
