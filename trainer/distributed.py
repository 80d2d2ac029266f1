"""Process group and FSDP2 sharding for the trainer. One process is world size 1 with no process group;
under torchrun (WORLD_SIZE > 1) it is gloo on CPU and nccl on GPU, one device per local rank."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list, even: bool = True) -> list:
        """This rank's contiguous share of a list whose length the world size divides; with even=False
        every world-th item from this rank's index (shares differ by at most one)."""
        if not even:
            return items[self.rank::self.world]
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items cannot be split evenly over {self.world} ranks")
        n = len(items) // self.world
        return items[self.rank * n:(self.rank + 1) * n]

    def sum(self, values: list) -> list:
        """Elementwise sum over ranks of a list of floats (one all-reduce)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return type(value)(t.item())

    def gather(self, obj) -> list:
        """Every rank's object, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


SINGLE = Dist()


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def init_single_rank_group(device: torch.device) -> bool:
    """A one-rank process group in this process (an in-memory store), so that FSDP2 can hold the mixed
    precision policy of a single-device run. True when this call created it (the caller destroys it)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


def decoder_layers(model) -> list:
    from .policy import decoder_and_head

    layers = getattr(decoder_and_head(model)[0], "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder.layers to shard; FSDP2 sharding needs a "
                         "transformers decoder-only model (Llama, Qwen2, Mistral, ...)")
    return list(layers)


def shard_policy(runner, compute_dtype: torch.dtype | None):
    """FSDP2: fully_shard each decoder block, then the root (embeddings, final norm, LM head). The parameters
    keep their dtype (fp32 masters); with compute_dtype (bf16) forward and backward run on bf16 copies and
    gradients are reduced into fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def policy(cast_forward_inputs):
        if compute_dtype is None:
            return {}
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                  cast_forward_inputs=cast_forward_inputs)}

    for layer in decoder_layers(runner.model):
        fully_shard(layer, **policy(True))
    # The root's inputs are advantages and old / reference log-probs: they stay fp32 (a bf16 old log-prob
    # near -5 is off by up to 0.016, a 1.6% error in the ratio).
    fully_shard(runner, reshard_after_forward=False, **policy(False))
    return runner
