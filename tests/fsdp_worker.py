"""Run by test_fsdp_update_rules in spawned processes: N update-rule steps on a tiny FSDP2 model."""

import os

import torch
import torch.distributed as dist

from gxpo_kernels import GXPO, Muon

STEPS = 4
MUON_STEPS = 3  # muon_worker's runs


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 7, generator=g), torch.randn(32, 3, generator=g)


def run_steps(model, opt_kwargs, stats=None, steps=STEPS):
    """stats: a list that gets each step's last_stats. A Muon base takes the named parameters."""
    x, y = batch()
    opt = GXPO(model.named_parameters() if opt_kwargs.get("base") is Muon else model.parameters(), **opt_kwargs)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    decisions = []
    for _ in range(steps):
        opt.step(closure)
        decisions.append((opt.last_stats["active"], opt.gate.open, opt.last_stats.get("z")))
        if stats is not None:
            stats.append(dict(opt.last_stats))
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


def record_matrix_rho(rhos: list):
    """GXPO over Muon: each step's per-matrix rho (retention_step's one update_space_retention call) into rhos."""
    from gxpo_kernels.optim import retention_step

    original = retention_step.update_space_retention

    def recording(cross, self_dot, K, delta):
        rho, scale = original(cross, self_dot, K, delta)
        rhos.append(rho.detach().clone())
        return rho, scale

    retention_step.update_space_retention = recording
    return original


def sharded_tiny_model():
    from torch.distributed.fsdp import fully_shard

    model = tiny_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def dcp_round_trip(opt_kwargs, checkpoint) -> list:
    """Two steps, a DCP checkpoint of model and rule, a third step; a perturbed model and a fresh rule loaded
    from the checkpoint take the third step again: the largest difference of each parameter."""
    import torch.distributed.checkpoint as dcp

    x, y = batch()

    def closure_of(model):
        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return closure

    model = sharded_tiny_model()
    opt = GXPO(model.named_parameters(), **opt_kwargs)
    for _ in range(2):
        opt.step(closure_of(model))
    dcp.save(opt.sharded_state_dict(model), checkpoint_id=checkpoint)
    opt.step(closure_of(model))
    fresh = sharded_tiny_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_opt = GXPO(fresh.named_parameters(), **opt_kwargs)
    template = fresh_opt.sharded_state_dict(fresh)
    dcp.load(template, checkpoint_id=checkpoint)
    fresh_opt.load_sharded_state_dict(fresh, template)
    fresh_opt.step(closure_of(fresh))
    return [(a.full_tensor() - b.full_tensor()).abs().max().item()
            for a, b in zip(fresh.parameters(), model.parameters(), strict=True)]


def muon_worker(rank, world_size, init_file, out_file, opt_kwargs):
    """GXPO over Muon on the sharded tiny model: as it is; a DCP checkpoint round trip; then with the mutation
    that takes each matrix's dot products from this rank's shard alone (no all-reduce)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from gxpo_kernels.optim import retention_step

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        record_matrix_rho(rhos := [])
        out = {}
        for variant in ("whole", "dcp", "local_dots"):
            rhos.clear()
            if variant == "dcp":
                out["dcp"] = dcp_round_trip(opt_kwargs, f"{out_file}.checkpoint")
                continue
            if variant == "local_dots":
                retention_step.reduce_matrix_dots = lambda dots, all_reduce: dots
            model = sharded_tiny_model()
            stats = []
            run_steps(model, opt_kwargs, stats, steps=MUON_STEPS)
            out[variant] = {"rhos": list(rhos), "stats": stats,
                            "params": [p.full_tensor().detach().clone() for p in model.parameters()]}
        torch.save(out, f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
