"""A checkpoint written before the update rule gained an entry of its own state (here the PPO mini-batch gate's
gate_steps / gate_batch) still resumes: those entries take their defaults; the rest loads whole."""

import torch

from gxpo_kernels import GXPO
from trainer.checkpoint import load_latest_checkpoint, save_checkpoint


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    rule = GXPO(model.parameters(), lr=1e-2, gate="never")
    return model, rule, torch.optim.lr_scheduler.LambdaLR(rule, lambda s: 1.0)


def step(model, rule):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    rule.step(closure)


def test_a_checkpoint_without_the_newer_rule_entries_resumes(tmp_path, monkeypatch):
    model, rule, scheduler = setup()
    step(model, rule)
    newer = rule.own_state_dict()
    older = {k: v for k, v in newer.items() if k not in ("gate_steps", "gate_batch")}
    monkeypatch.setattr(rule, "own_state_dict", lambda: older)
    save_checkpoint(str(tmp_path), 1, model, rule, scheduler, {"backward_passes": 3, "wall_time_s": 0.0})
    monkeypatch.undo()

    model2, rule2, scheduler2 = setup()
    logged = []
    train = load_latest_checkpoint(str(tmp_path), model2, rule2, scheduler2, log=logged.append)
    assert train is not None and train["step"] == 1
    assert any("gate_steps" in m and "gate_batch" in m for m in logged), logged
    assert rule2.gate_steps == rule2.steps == 1 and not rule2.in_gate_batch
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    step(model, rule), step(model2, rule2)  # the next step as if never interrupted
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))


def test_a_checkpoint_missing_model_state_is_still_refused(tmp_path, monkeypatch):
    """Only the rule's own entries may be absent: a checkpoint without a model tensor is unreadable."""
    model, rule, scheduler = setup()
    step(model, rule)
    save_checkpoint(str(tmp_path), 1, model, rule, scheduler, {"backward_passes": 3, "wall_time_s": 0.0})
    model2 = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 3))  # a parameter the checkpoint lacks
    rule2 = GXPO(model2.parameters(), lr=1e-2, gate="never")
    logged = []
    assert load_latest_checkpoint(str(tmp_path), model2, rule2, torch.optim.lr_scheduler.LambdaLR(
        rule2, lambda s: 1.0), log=logged.append) is None
    assert any("unreadable" in m for m in logged), logged
