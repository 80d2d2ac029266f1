"""The rollout-allocation and prompt-construction slots: which prompts get how many completions, and
what the model sees when sampling. GRPO's default: group_size completions of the plain prompt; a
plug-in's rollouts hook (XRPO's, trainer/plugins/xrpo.py) takes the slot over."""

from dataclasses import dataclass

import torch

from .rollout import RolloutBatch


@dataclass
class Collected:
    batch: RolloutBatch  # rows grouped by prompt, in prompt order
    rewards: torch.Tensor  # [rows]
    group_sizes: list  # rows per prompt
    stats: dict


def chat_messages(system_prompt: str, question: str, exemplars: list) -> list:
    """Chat messages: the system prompt, each exemplar (question, solution) as a user/assistant turn (XRPO's
    seeding), then the question."""
    messages = [{"role": "system", "content": system_prompt}]
    for q, s in exemplars:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": s}]
    return messages + [{"role": "user", "content": question}]


def prompt_text(tokenizer, question, system_prompt, exemplars=()):
    messages = chat_messages(system_prompt, question, list(exemplars))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def score(batch, golds, reward_fn):
    return torch.tensor([reward_fn(t, g) for t, g in zip(batch.texts, golds, strict=True)], dtype=torch.float32)


def collect(engine, tokenizer, cfg, keyed_problems: list, step: int, reward_fn, phases, rollouts=None,
            rollout_state=None):
    """keyed_problems: this rank's [(problem, key)]. Returns Collected; `phases` (the step's Phases timer)
    gets the wall-clock of sampling ("rollout") and scoring ("reward"). rollouts: a plug-in's hook that
    takes over the slot (the same arguments and its plug-in's state, rollout_state); default GRPO's
    group_size plain samples."""
    if rollouts is not None:
        return rollouts(engine, tokenizer, cfg, keyed_problems, step, reward_fn, phases, rollout_state)
    G = cfg.rollout.group_size
    plain = [prompt_text(tokenizer, p.question, cfg.task.system_prompt) for p, _ in keyed_problems]
    with phases("rollout"):
        batch = engine.generate(plain, G, [k for _, k in keyed_problems])
    with phases("reward"):
        rewards = score(batch, [p.answer for p, _ in keyed_problems for _ in range(G)], reward_fn)
    return Collected(batch, rewards, [G] * len(keyed_problems), {})
