"""Zero-advantage completions leave every pass (beta 0, no entropy gate), and the step is unchanged:
parameters after one update with skipping equal those without, for every loss_agg and each rule."""

import pytest
import torch

pytest.importorskip("transformers")
from gxpo_bench.step import synthetic_batch  # noqa: E402
from trainer.closure import LossClosure, make_update_rule, run_update, skips_zero_advantages  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.models import load_policy  # noqa: E402
from trainer.policy import PolicyRunner  # noqa: E402

RULES = {"grpo": [], "gxpo": [("gxpo.preset", "paper"), ("gxpo.gate", "never")],
         "sfpo": [("sfpo.gate", "never"), ("sfpo.K", "2")]}


@pytest.fixture(autouse=True)
def cpu_paths(monkeypatch):
    from gxpo_kernels import backend

    monkeypatch.setattr(backend, "use_triton", lambda t: t.is_cuda)


def one_update(algo, loss_agg, skip, adv, pack=True, dtype=torch.float64):
    cfg = load_config(overrides=[("model", "tiny-random"), ("algo", algo), ("optim.lr", "1e-3"),
                                 ("loss.loss_agg", loss_agg), ("loss.max_completion_len", "12"),
                                 ("loss.skip_zero_advantage", str(skip)), ("loss.pack", str(pack)),
                                 ("loss.micro_batch_size", "2"), *RULES[algo]])
    model, tokenizer = load_policy("tiny-random", dtype, seed=0)
    runner = PolicyRunner(model)
    params = [p for p in runner.parameters() if p.requires_grad]
    rule = make_update_rule(cfg, params)
    batch = synthetic_batch(len(tokenizer), len(adv), 5, 10, torch.device("cpu"), seed=3)
    calls = []
    real_forward = runner.forward
    runner.forward = lambda kind, *a, **k: (calls.append(kind), real_forward(kind, *a, **k))[1]
    closure = LossClosure(runner, batch, torch.tensor(adv, dtype=dtype), cfg)
    run_update(rule, closure)
    return [p.detach().clone() for p in params], calls, closure


@pytest.mark.parametrize("algo", ["grpo", "gxpo", "sfpo"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_skipping_leaves_the_update_unchanged(algo, loss_agg):
    adv = [0.8, 0.0, -1.1, 0.0, 0.5, 0.0]
    skipped, calls, closure = one_update(algo, loss_agg, True, adv)
    full, _, _ = one_update(algo, loss_agg, False, adv)
    assert closure.rows == [0, 2, 4] and 0.2 < closure.stats["pack/skipped_token_frac"] < 0.8
    for a, b in zip(skipped, full, strict=True):
        assert (a - b).abs().max() <= 1e-10, (a - b).abs().max()  # the same math in another order


def test_padded_micro_batches_skip_too():
    adv = [0.0, 1.0, 0.0, -0.5, 0.3, 0.0, 0.0]
    skipped, _, closure = one_update("grpo", "seq-mean-token-mean", True, adv, pack=False)
    full, _, _ = one_update("grpo", "seq-mean-token-mean", False, adv, pack=False)
    assert [r.tolist() for r, _ in closure.micro_batches] == [[1, 3], [4]]
    for a, b in zip(skipped, full, strict=True):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("algo", ["grpo", "gxpo"])
def test_all_zero_advantages_run_no_pass(algo):
    adv = [0.0] * 4
    skipped, calls, _ = one_update(algo, "token-mean", True, adv)
    full, full_calls, _ = one_update(algo, "token-mean", False, adv)
    assert calls == [] and full_calls
    for a, b in zip(skipped, full, strict=True):
        assert torch.equal(a, b)


def test_skipping_applies_only_where_exact():
    cfg = lambda *kv: load_config(overrides=list(kv))  # noqa: E731
    assert skips_zero_advantages(cfg(("algo", "grpo")))
    assert not skips_zero_advantages(cfg(("algo", "grpo"), ("loss.beta", "0.01")))  # KL: zero-A tokens train
    assert not skips_zero_advantages(cfg(("algo", "gxpo")))  # preset final: its gate reads the batch entropy
    assert skips_zero_advantages(cfg(("algo", "gxpo"), ("gxpo.preset", "paper")))
    assert not skips_zero_advantages(cfg(("algo", "sfpo")))
    assert not skips_zero_advantages(cfg(("algo", "grpo"), ("loss.skip_zero_advantage", "false")))
