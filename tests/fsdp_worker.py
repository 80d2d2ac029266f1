"""Run by test_fsdp_update_rules in spawned processes: N update-rule steps on a tiny FSDP2 model."""

import os

import torch
import torch.distributed as dist

from gxpo_kernels import GXPO

STEPS = 4


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 7, generator=g), torch.randn(32, 3, generator=g)


def run_steps(model, opt_kwargs):
    x, y = batch()
    opt = GXPO(model.parameters(), **opt_kwargs)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    decisions = []
    for _ in range(STEPS):
        opt.step(closure)
        decisions.append((opt.last_stats["active"], opt.gate.open, opt.last_stats.get("z")))
    return decisions, opt.backward_passes


def worker(rank, world_size, init_file, out_file, opt_kwargs):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        decisions, passes = run_steps(model, opt_kwargs)
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        torch.save({"decisions": decisions, "params": full, "passes": passes}, f"{out_file}.{rank}")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
