"""The plug-ins' math by hand (XRPO allocator, seeding, sharpening; GRPO-lambda) and each plug-in
training 2 steps with the tiny model under grpo and gxpo."""

import math

import pytest
import torch

from trainer.advantages import group_normalized, group_normalized_ragged
from trainer.plugins import xrpo_allocator as alloc
from trainer.plugins.grpo_lambda import grpo_lambda_advantages, trace_weights
from trainer.plugins.xrpo_seeding import SolutionCorpus, lexical_similarity
from trainer.plugins.xrpo_sharpening import sharpen


def test_allocator_hand_computed_case():
    # prompt 0: rewards {0, 1} (std 0.7071); prompt 1: {1, 1} (std 0): one extra rollout, bonus 0 at step 0
    extra = alloc.allocate([[0.0, 1.0], [1.0, 1.0]], [2, 2], budget=1, step=0, bonus=1.0)
    assert extra == [1, 0]
    std = math.sqrt(0.5)
    gain = 12.7062 * std / math.sqrt(2) - 4.3027 * std / math.sqrt(3)
    assert alloc.priority([0.0, 1.0], 2, step=0, bonus=1.0) == pytest.approx(gain)
    assert alloc.priority([1.0, 1.0], 2, step=3, bonus=0.5) == pytest.approx(0.5 * math.sqrt(math.log(4) / 2))


def test_allocator_budget_uncertainty_bonus_and_determinism():
    g = torch.Generator().manual_seed(0)
    rewards = [torch.bernoulli(torch.full((3,), p), generator=g).tolist() for p in (0.5, 0.5, 0.5, 0.5)]
    rewards = [[0.0, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]] + rewards[:1]
    for budget in (0, 1, 7, 23):
        extra = alloc.allocate(rewards, [3] * 5, budget, step=5, bonus=0.1)
        assert sum(extra) == budget and min(extra) >= 0
        assert extra == alloc.allocate(rewards, [3] * 5, budget, step=5, bonus=0.1)
    extra = alloc.allocate(rewards, [3] * 5, 23, step=5, bonus=0.1)
    assert extra[1] > extra[2] and extra[0] > extra[3]  # uncertain prompts get more
    assert extra[2] > 0 and extra[3] > 0  # zero-variance prompts still get the bonus share
    assert alloc.phase_budgets(10, 3) == [4, 3, 3] and sum(alloc.phase_budgets(7, 7)) == 7
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        alloc.allocate([[1.0]], [1], 1, 0, 0.1)
    assert alloc.t_quantile_975(11) == pytest.approx(2.2010, abs=1e-3)
    assert alloc.t_quantile_975(30) == pytest.approx(2.0423, abs=1e-3)


def test_seeding_exemplars():
    corpus = SolutionCorpus()
    assert corpus.exemplars("What is 3 + 4?", 2, 100) == []  # empty corpus: the prompt stays plain
    corpus.add("What is 3 + 4?", "7, its own solution")
    corpus.add("What is 3 + 5?", "3 + 5 = 8. " + "x" * 500)
    corpus.add("Name a colour.", "red")
    corpus.add("What is 2 + 4?", "6")
    got = corpus.exemplars("What is 3 + 4?", 2, max_chars=20)
    assert [q for q, _ in got] == ["What is 3 + 5?", "What is 2 + 4?"]  # never its own; most similar first
    assert got[0][1] == "3 + 5 = 8. " + "x" * 9 and len(got[0][1]) == 20
    assert lexical_similarity("a b", "a b") == pytest.approx(1.0) and lexical_similarity("a", "b") == 0.0


def test_seeded_prompt_in_collect(monkeypatch):
    from trainer.collect import prompt_text
    from trainer.models import tiny_tokenizer

    tok = tiny_tokenizer()
    plain = prompt_text(tok, "1 + 1", "sys")
    seeded = prompt_text(tok, "1 + 1", "sys", [("2 + 2", "4")])
    assert plain.endswith("user: 1 + 1\nassistant: ") and "user: 2 + 2\nassistant: 4\n" in seeded


def test_paper_defaults_and_their_named_variants(monkeypatch):
    """XRPO as the paper writes it: T in the bonus counts steps from 1 (at the first step the bonus already
    spreads zero-variance prompts), a prompt is seeded when none of its rollouts got any reward, and s(y)
    is taken under pi_theta (temperature 1); each earlier choice stays as a named option."""
    from types import SimpleNamespace

    from trainer import collect
    from trainer.config import load_config
    from trainer.models import tiny_tokenizer
    from trainer.plugins import PLUGINS
    from trainer.plugins.xrpo_seeding import all_failed
    from trainer.rollout import RolloutBatch
    from trainer.tasks import Problem
    from trainer.train import Phases

    zero_var = [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert alloc.allocate(zero_var, [2, 2, 2], 6, step=0, bonus=0.1) == [6, 0, 0]  # log(1 + 0) = 0: no bonus
    assert alloc.allocate(zero_var, [2, 2, 2], 6, step=1, bonus=0.1) == [2, 2, 2]
    clocks = []
    monkeypatch.setattr(alloc, "allocate", lambda r, n, b, clock, bonus: clocks.append(clock) or
                        [b] + [0] * (len(r) - 1))

    class Engine:  # every completion the same two tokens
        def generate_rows(self, prompts, seeds, temperature=None):
            return RolloutBatch.from_rows([(torch.tensor([5, 6]), torch.tensor([7, 1])) for _ in prompts],
                                          ["x"] * len(prompts), 0, None)

    keyed = [(Problem("1 + 1", "2"), 0), (Problem("2 + 2", "4"), 1)]
    for bonus_step, expected in (("one_based", 4), ("zero_based", 3)):
        cfg = load_config(overrides=[("recipe", "xrpo"), ("rollout.group_size", "4"), ("xrpo.bonus_step", bonus_step),
                                     ("xrpo.phases", "1"), ("xrpo.sharpening", "false"), ("xrpo.seeding", "false")])
        clocks.clear()
        got = collect.collect(Engine(), tiny_tokenizer(), cfg, keyed, 3, lambda t, g: 1.0, Phases(),
                              PLUGINS["xrpo"].rollouts, None)
        assert clocks == [expected] and got.group_sizes == [6, 2]
    assert all_failed([0.0, 0.0]) and not all_failed([0.0, 0.5]) and all_failed([0.0, 0.5], "below_one")
    assert not all_failed([]) and not all_failed([1.0, 0.0], "below_one")

    seen = []
    runner = SimpleNamespace(logp=lambda batch, temperature: seen.append(temperature) or torch.zeros(2, 3))
    got = SimpleNamespace(rewards=torch.tensor([1.0, 0.0]), group_sizes=[2],
                          batch=SimpleNamespace(completion_mask=torch.ones(2, 3, dtype=torch.bool)))
    for choice, expected in (("policy", 1.0), ("sampling", 0.6)):
        cfg = load_config(overrides=[("recipe", "xrpo"), ("rollout.temperature", "0.6"),
                                     ("xrpo.sharpen_temperature", choice)])
        PLUGINS["xrpo"].advantages(SimpleNamespace(cfg=cfg, runner=runner), got, torch.tensor([1.0, -1.0]))
        assert seen[-1] == expected


def test_sharpening_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.5, 1.0])
    mean_logp = torch.tensor([-3.0, -1.0, -1.0, -1.0])
    out, grown = sharpen(adv, mean_logp, [4])
    s = mean_logp.double()
    eta = torch.exp(s - s.mean())  # s.mean() = -1.5
    expected0 = 1.0 + min(max(2.5 * (1 - eta[0].item()), 0), 0.5 * 1.0)
    assert out[0].item() == pytest.approx(expected0) and expected0 == pytest.approx(1.5)  # capped at k * A
    assert out[1] == adv[1] and out[2] == adv[2] and out[3] == adv[3]  # likely ones (eta > 1) and negatives
    assert grown == 1
    g = torch.Generator().manual_seed(0)
    adv, logp = torch.randn(40, generator=g), -torch.rand(40, generator=g) * 5
    out, _ = sharpen(adv, logp, [10, 10, 20])
    assert torch.equal(out[adv <= 0], adv[adv <= 0])
    assert ((out - adv)[adv > 0] <= 0.5 * adv[adv > 0] + 1e-6).all() and (out >= adv).all()


def test_grpo_lambda_traces_by_hand():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    w = trace_weights(mask, lam=0.5, gamma=1.0, trace="recent")
    assert torch.allclose(w, torch.tensor([[0.25, 0.5, 1.0, 0.0], [1.0, 0, 0, 0]], dtype=torch.float64))
    both = trace_weights(mask, lam=0.5, gamma=0.8, trace="both")
    d = 0.4
    assert torch.allclose(both[0, :3], torch.tensor([1.0, d, 1.0], dtype=torch.float64))
    adv = grpo_lambda_advantages(torch.tensor([2.0, -1.0]), mask, lam=0.5, gamma=1.0, neg_clamp=-0.1)
    assert torch.allclose(adv, torch.tensor([[0.5, 1.0, 2.0, 0.0], [-0.1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="trace must be one of"):
        trace_weights(mask, 0.5, 1.0, "forward")


def test_ragged_groups_match_equal_groups():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    a, s = group_normalized(r.view(2, 3))
    b, t = group_normalized_ragged(r, [3, 3])
    assert torch.equal(a, b) and s == t
    c, stats = group_normalized_ragged(r, [2, 2, 2])
    assert stats["zero_variance_groups"] == 1 and torch.equal(c[2:4], torch.zeros(2))
    with pytest.raises(ValueError, match="do not partition"):
        group_normalized_ragged(r, [2, 2])


def test_plugins_are_registered_once_in_slot_order():
    from trainer.config import load_config
    from trainer.plugins import PLUGINS, Plugin, enabled_plugins, register

    assert [name for name, p in PLUGINS.items() if p.advantages] == ["xrpo", "grpo_lambda"]  # sharpen, then trace
    assert [name for name, p in PLUGINS.items() if p.token_mask] == ["capo"]
    on = enabled_plugins(load_config(overrides=[("recipe", "capo"), ("grpo_lambda.enabled", "true")]))
    assert [p.name for p in on] == ["grpo_lambda", "capo"]
    assert enabled_plugins(load_config()) == []
    with pytest.raises(ValueError, match="registered twice"):
        register(Plugin("capo", "capo", enabled=lambda cfg: True))
    from trainer.config import RECIPES, TrainConfig

    sections = TrainConfig()
    for plugin in PLUGINS.values():  # each has its config section (checks, resolve) and its --recipe
        assert plugin.recipe in RECIPES and callable(getattr(sections, plugin.name).resolve)
