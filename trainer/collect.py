"""The rollout-allocation and prompt-construction slots: which prompts get how many completions, and
what the model sees when sampling. GRPO's default: group_size completions of the plain prompt. XRPO
(allocator and/or seeding): n0 completions each, then the rest of the budget in phases, given out by
uncertainty gain + exploration bonus (trainer/plugins/xrpo_allocator.py); prompts whose completions
all failed so far are sampled with solved exemplars in context (trainer/plugins/xrpo_seeding.py).

Budgets are per rank (each rank allocates over its own prompts), so every rank holds the same number
of rows and makes the same number of collective calls."""

from dataclasses import dataclass

import torch

from .plugins import xrpo_allocator
from .plugins.xrpo_seeding import all_failed, seeded_messages
from .rollout import RolloutBatch
from .sampling import row_seed


@dataclass
class Collected:
    batch: RolloutBatch  # rows grouped by prompt, in prompt order
    rewards: torch.Tensor  # [rows]
    group_sizes: list  # rows per prompt
    stats: dict


def prompt_text(tokenizer, question, system_prompt, exemplars=()):
    messages = seeded_messages(system_prompt, question, list(exemplars))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _score(batch, golds, reward_fn):
    return torch.tensor([reward_fn(t, g) for t, g in zip(batch.texts, golds, strict=True)], dtype=torch.float32)


def collect(engine, tokenizer, cfg, keyed_problems: list, step: int, reward_fn, phases, corpus=None):
    """keyed_problems: this rank's [(problem, key)]. Returns Collected; `phases` (the step's Phases timer)
    gets the wall-clock of sampling ("rollout") and scoring ("reward")."""
    x, G = cfg.xrpo, cfg.rollout.group_size
    system = cfg.task.system_prompt
    plain = [prompt_text(tokenizer, p.question, system) for p, _ in keyed_problems]
    if not (x.allocator or x.seeding):
        with phases("rollout"):
            batch = engine.generate(plain, G, [k for _, k in keyed_problems])
        with phases("reward"):
            rewards = _score(batch, [p.answer for p, _ in keyed_problems for _ in range(G)], reward_fn)
        return Collected(batch, rewards, [G] * len(keyed_problems), {})

    n_prompts = len(keyed_problems)
    first = x.n0 if x.allocator else max(1, G // 2)
    counts, rewards, parts, seeded = [first] * n_prompts, [[] for _ in keyed_problems], [], 0
    budgets = xrpo_allocator.phase_budgets(n_prompts * (G - first), x.phases if x.allocator else 1)
    plan = [[first] * n_prompts]  # rollouts per prompt, phase by phase
    for phase in range(len(budgets) + 1):
        if phase > 0:
            if x.allocator:
                clock = step + 1 if x.bonus_step == "one_based" else step  # the paper's T counts steps from 1
                extra = xrpo_allocator.allocate(rewards, counts, budgets[phase - 1], clock, x.bonus)
            else:  # seeding alone: the second half of each group, as GRPO would have sampled it
                extra = [G - first] * n_prompts
            plan.append(extra)
        wanted = plan[-1]
        rows_prompt, rows_seed, rows_owner = [], [], []
        for i, ((problem, key), n) in enumerate(zip(keyed_problems, wanted, strict=True)):
            if n == 0:
                continue
            text = plain[i]
            if x.seeding and phase > 0 and all_failed(rewards[i], x.seed_when) and corpus is not None and len(corpus):
                exemplars = corpus.exemplars(problem.question, x.max_exemplars, x.max_chars)
                text = prompt_text(tokenizer, problem.question, system, exemplars)
                seeded += n
            start = len(rewards[i])
            for j in range(start, start + n):
                rows_prompt.append(text)
                rows_seed.append(row_seed(key, j))
                rows_owner.append(i)
        if not rows_prompt:
            continue
        with phases("rollout"):
            part = engine.generate_rows(rows_prompt, rows_seed)
        with phases("reward"):
            scores = _score(part, [keyed_problems[i][0].answer for i in rows_owner], reward_fn)
        for i, r in zip(rows_owner, scores.tolist(), strict=True):
            rewards[i].append(r)
        parts.append((part, rows_owner))
        if phase > 0:
            counts = [c + e for c, e in zip(counts, wanted, strict=True)]
    sampled = RolloutBatch.concat([part for part, _ in parts], tokenizer.pad_token_id)
    rows, texts, logps = sampled.rows(), sampled.texts, sampled.row_logps()
    owners = [i for _, owner in parts for i in owner]
    order = sorted(range(len(rows)), key=lambda r: owners[r])  # stable: phase order within a prompt
    if x.loss_context == "original":  # the loss sees the plain prompt, not the exemplars
        plain_ids = [tokenizer(t, add_special_tokens=False, return_tensors="pt").input_ids[0].to(rows[0][0].device)
                     for t in plain]
        rows = [(plain_ids[owners[r]], c) for r, (_, c) in enumerate(rows)]
    batch = RolloutBatch.from_rows([rows[r] for r in order], [texts[r] for r in order], tokenizer.pad_token_id,
                                   None if logps is None else [logps[r] for r in order])
    group_sizes = [sum(1 for o in owners if o == i) for i in range(n_prompts)]
    flat_rewards = torch.tensor([r for i in range(n_prompts) for r in rewards[i]], dtype=torch.float32)
    stats = {"xrpo/seeded_rows": seeded, "xrpo/max_group": max(group_sizes), "xrpo/min_group": min(group_sizes)}
    return Collected(batch, flat_rewards, group_sizes, stats)
