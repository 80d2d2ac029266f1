"""Two-rank FSDP2 on CPU (gloo): the same parameters and gate decisions as one process."""

import pytest
import torch
import torch.multiprocessing as mp
from fsdp_worker import run_steps, tiny_model, worker

from gxpo_kernels import FlatAdamW

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("opt_kwargs", [
    {"lr": 1e-2, "preset": "paper", "tau": 0.615, "max_grad_norm": 0.5},  # trips on step 2 (|Z| 0.604, then 0.623)
    {"lr": 1e-2, "preset": "paper", "gate": "never", "optimizer_state": "transactional"},
    # the authors' retention spaces: the RMS thresholds over the whole tensor, every shard
    {"lr": 1e-2, "retention_space": "update", "gate": "never", "optimizer_state": "transactional",
     "max_grad_norm": 0.5, "K": 5, "alpha": 0.3},
    {"lr": 1e-2, "retention_space": "grad", "gate": "never", "optimizer_state": "transactional_fast_state",
     "max_grad_norm": 0.5, "K": 10, "alpha": 0.3},
    # the same inside FlatAdamW's two launches (the interpreter): the per-tensor sums all-reduced on the device
    {"lr": 1e-2, "base": FlatAdamW, "retention_space": "update", "gate": "never", "optimizer_state": "transactional",
     "max_grad_norm": 0.5, "K": 5, "alpha": 0.3},
    {"lr": 1e-2, "base": FlatAdamW, "retention_space": "grad", "gate": "never", "max_grad_norm": 0.5, "K": 10,
     "alpha": 0.3},
])
def test_two_rank_fsdp2_matches_single_process(tmp_path, opt_kwargs):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), opt_kwargs), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]

    model = tiny_model()
    decisions, passes = run_steps(model, opt_kwargs)
    for result in ranks:
        assert result["passes"] == passes
        assert [d[:2] for d in result["decisions"]] == [d[:2] for d in decisions]
        for got, want in zip(result["decisions"], decisions, strict=True):
            assert got[2] == (None if want[2] is None else pytest.approx(want[2], rel=1e-4, abs=1e-6))
        for p_fsdp, p_single in zip(result["params"], model.parameters(), strict=True):
            assert torch.allclose(p_fsdp, p_single.detach(), rtol=1e-5, atol=1e-6)


def test_the_gate_case_trips_mid_run():
    decisions, passes = run_steps(tiny_model(), {"lr": 1e-2, "preset": "paper", "tau": 0.615, "max_grad_norm": 0.5})
    assert [d[0] for d in decisions] == [1.0, 1.0, 0.0, 0.0] and passes == 3 + 3 + 1 + 1
