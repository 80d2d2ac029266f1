"""XRPO (Bamba et al. 2025, arXiv 2510.06672) as a plug-in: its config section, the rollout hook (the
allocator, xrpo_allocator.py, and seeding, xrpo_seeding.py) and the advantages hook (novelty sharpening,
xrpo_sharpening.py)."""

from dataclasses import dataclass

import torch

from ..collect import Collected, collect, prompt_text, score
from ..rollout import RolloutBatch
from ..sampling import row_seed
from . import Plugin, xrpo_allocator
from .xrpo_seeding import SolutionCorpus, all_failed
from .xrpo_sharpening import sharpen


@dataclass
class XRPOConfig:
    allocator: bool | None = None  # None: on under --recipe xrpo
    seeding: bool | None = None
    sharpening: bool | None = None
    n0: int = 2  # first-phase rollouts per prompt (the rest of the group_size budget is allocated)
    phases: int = 3
    bonus: float = 0.1  # exploration bonus lambda
    max_exemplars: int = 2
    max_chars: int = 800  # exemplar solutions are cut here
    loss_context: str = "sampled"  # | "original": the loss sees the prompt without the exemplars
    sharpen_l: float = 2.5
    sharpen_k: float = 0.5
    # Where the paper's text and earlier versions of this code differ (README, XRPO); defaults follow the paper.
    sharpen_temperature: str = "policy"  # s(y) under pi_theta (T = 1) | "sampling": at rollout.temperature
    bonus_step: str = "one_based"  # T in lambda sqrt(log(1 + T) / n) is the step number from 1 | "zero_based"
    seed_when: str = "zero_reward"  # seed a prompt whose best reward so far is 0 | "below_one": below 1

    def checks(self, cfg) -> list:
        """(field, holds, what it must be) for each field; cfg is the whole config."""
        return [
            ("n0", not self.allocator or 2 <= self.n0 <= cfg.rollout.group_size,
             "in [2, rollout.group_size] (the allocator needs a sample std per prompt)"),
            ("phases", self.phases >= 1, ">= 1"),
            ("bonus", self.bonus >= 0, ">= 0"),
            ("max_exemplars", self.max_exemplars >= 1, ">= 1"),
            ("max_chars", self.max_chars >= 1, ">= 1"),
            ("loss_context", self.loss_context in ("sampled", "original"), "'sampled' or 'original'"),
            ("sharpen_k", self.sharpen_k >= 0, ">= 0"),
            ("sharpen_temperature", self.sharpen_temperature in ("policy", "sampling"), "'policy' or 'sampling'"),
            ("bonus_step", self.bonus_step in ("one_based", "zero_based"), "'one_based' or 'zero_based'"),
            ("seed_when", self.seed_when in ("zero_reward", "below_one"), "'zero_reward' or 'below_one'"),
        ]

    def resolve(self, recipe_on: bool):
        """Parts left unset (None) are on under --recipe xrpo."""
        for name in ("allocator", "seeding", "sharpening"):
            if getattr(self, name) is None:
                setattr(self, name, recipe_on)


def sharpen_advantages(trainer, got, adv_B):
    """The advantages slot: s(y) from one no-grad forward of the current policy, at temperature 1 (pi_theta,
    the paper) or the sampling temperature (xrpo.sharpen_temperature); nothing with sharpening off."""
    cfg = trainer.cfg
    if not cfg.xrpo.sharpening:
        return adv_B, {}
    temperature = 1.0 if cfg.xrpo.sharpen_temperature == "policy" else cfg.rollout.temperature
    logp_BT = trainer.runner.logp(got.batch, temperature)
    mask = got.batch.completion_mask
    mean_logp = (torch.where(mask, logp_BT, 0.0).sum(1) / mask.sum(1).clamp(min=1)).cpu()
    adv_B, grown = sharpen(adv_B, mean_logp, got.group_sizes, cfg.xrpo.sharpen_l, cfg.xrpo.sharpen_k)
    return adv_B, {"xrpo/sharpened_rows": grown}


def xrpo_rollouts(engine, tokenizer, cfg, keyed_problems: list, step: int, reward_fn, phases, corpus=None):
    # corpus: the plug-in's state (a SolutionCorpus with seeding on, else None)
    """The rollout slot (trainer/collect.py's collect with the allocator and / or seeding on): n0
    completions each, then the rest of the budget in phases, given out by uncertainty gain + exploration
    bonus (xrpo_allocator.py); prompts whose completions all failed so far are sampled with solved
    exemplars in context (xrpo_seeding.py). Budgets are per rank (each rank allocates over its own
    prompts), so every rank holds the same number of rows and makes the same number of collective calls."""
    x, G = cfg.xrpo, cfg.rollout.group_size
    if not (x.allocator or x.seeding):  # sharpening alone: GRPO's rollouts
        return collect(engine, tokenizer, cfg, keyed_problems, step, reward_fn, phases)
    system = cfg.task.system_prompt
    plain = [prompt_text(tokenizer, p.question, system) for p, _ in keyed_problems]
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
            scores = score(part, [keyed_problems[i][0].answer for i in rows_owner], reward_fn)
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


def add_solved(trainer, keyed, got, corpus):
    """Correct completions join the exemplar corpus (gathered over ranks, so every rank has the same)."""
    if corpus is None:
        return
    owners = [i for i, n in enumerate(got.group_sizes) for _ in range(n)]
    solved = [(keyed[i][0].question, text) for i, text, r in zip(owners, got.batch.texts, got.rewards.tolist(),
                                                                  strict=True) if r >= 1]
    for part in trainer.d.gather(solved):
        for question, text in part:
            corpus.add(question, text)


PLUGIN = Plugin("xrpo", "xrpo", enabled=lambda cfg: cfg.xrpo.allocator or cfg.xrpo.seeding or cfg.xrpo.sharpening,
                advantages=sharpen_advantages, rollouts=xrpo_rollouts, observe=add_solved,
                state=lambda trainer: SolutionCorpus() if trainer.cfg.xrpo.seeding else None)
