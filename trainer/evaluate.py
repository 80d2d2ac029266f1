"""Held-out evaluation: pass@1 averaged over n samples per problem, and pass@k (the unbiased estimator
of Chen et al. 2021: 1 - C(n - c, k) / C(n, k) for c correct out of n)."""

from math import comb

import torch

from .collect import prompt_text
from .sampling import row_seed


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@torch.no_grad()
def evaluate(engine, prompts: list, answers: list, keys: list, reward_fn, n_samples: int, k: int, dist=None,
             temperature=None) -> dict:
    """Sample n_samples completions per held-out prompt with the rollout engine (at `temperature`, None:
    the rollout's) and score them. Under several ranks each samples its share of the prompts and the
    counts are gathered."""
    local = list(zip(prompts, answers, keys, strict=True))
    if dist is not None:
        local = dist.shard(local, even=False)
    batch = engine.generate([p for p, _, _ in local], n_samples, [key for _, _, key in local], temperature)
    golds = [a for _, a, _ in local for _ in range(n_samples)]
    correct = torch.tensor([reward_fn(t, g) >= 1 for t, g in zip(batch.texts, golds, strict=True)])
    per_problem = correct.view(len(local), n_samples).sum(1).tolist()
    if dist is not None:
        per_problem = [c for part in dist.gather(per_problem) for c in part]
    return {
        "eval/pass@1": sum(c / n_samples for c in per_problem) / len(prompts),
        f"eval/pass@{k}": sum(pass_at_k(n_samples, c, k) for c in per_problem) / len(prompts),
    }


EVAL_KEY = 2**31  # keys evaluation samples apart from training samples


def evaluate_sets(sets: dict, engine, tokenizer, cfg, step: int, reward_fn, d) -> dict:
    """pass@1 and pass@k of each held-out set (eval/<name>/...), and their means as eval/pass@1, eval/pass@k."""
    out = {}
    for index, (name, problems) in enumerate(sets.items()):
        prompts = [prompt_text(tokenizer, p.question, cfg.task.system_prompt) for p in problems]
        keys = [row_seed(cfg.seed, EVAL_KEY + index, step, i) for i in range(len(problems))]
        scores = evaluate(engine, prompts, [p.answer for p in problems], keys, reward_fn, cfg.eval.n_samples,
                          cfg.eval.k, d, cfg.eval.temperature)
        out.update({k.replace("eval/", f"eval/{name}/") if name else k: v for k, v in scores.items()})
    if "" not in sets:  # benchmarks: their mean
        for metric in ("pass@1", f"pass@{cfg.eval.k}"):
            out[f"eval/{metric}"] = sum(out[f"eval/{name}/{metric}"] for name in sets) / len(sets)
    return out
