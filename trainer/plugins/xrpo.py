"""XRPO (Bamba et al. 2025, arXiv 2510.06672) as a plug-in: its config section, and the advantages hook
(novelty sharpening, xrpo_sharpening.py). Its allocator (xrpo_allocator.py) and seeding (xrpo_seeding.py)
fill the rollout-allocation and prompt slots in trainer/collect.py."""

from dataclasses import dataclass

import torch

from . import Plugin
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
    the paper) or the sampling temperature (xrpo.sharpen_temperature)."""
    cfg = trainer.cfg
    temperature = 1.0 if cfg.xrpo.sharpen_temperature == "policy" else cfg.rollout.temperature
    logp_BT = trainer.runner.logp(got.batch, temperature)
    mask = got.batch.completion_mask
    mean_logp = (torch.where(mask, logp_BT, 0.0).sum(1) / mask.sum(1).clamp(min=1)).cpu()
    adv_B, grown = sharpen(adv_B, mean_logp, got.group_sizes, cfg.xrpo.sharpen_l, cfg.xrpo.sharpen_k)
    return adv_B, {"xrpo/sharpened_rows": grown}


PLUGIN = Plugin("xrpo", "xrpo", enabled=lambda cfg: cfg.xrpo.sharpening, advantages=sharpen_advantages)
