"""Flat state buffers for the update rules, and pointer tables over the parameters.

Parameters stay where they are (plain tensors, or FSDP2's DTensor local shards); per (device, dtype)
group the rule keeps theta0 and g0 in one flat buffer each, and the kernels walk int64 tables of
parameter and gradient data pointers, so every flat op is one launch per group.
"""

from dataclasses import dataclass, field

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel can address: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class FlatGroup:
    params: list  # the optimizer's parameters (maybe DTensors) of one device and dtype
    block: int
    numels: list = field(init=False)
    offsets: list = field(init=False)
    total: int = field(init=False)
    tables: dict = field(init=False)  # device int64 tensors: numels, offsets, block_tensor, block_start
    theta0: torch.Tensor = field(init=False)
    g0: torch.Tensor = field(init=False)

    def __post_init__(self):
        locals_ = [local(p) for p in self.params]
        for p in locals_:
            if not p.is_contiguous():
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous; the flat-buffer "
                                 "update rules need contiguous parameters")
        self.numels = [p.numel() for p in locals_]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.total = sum(self.numels)
        block_tensor, block_start = [], []
        for i, n in enumerate(self.numels):
            for start in range(0, n, self.block):
                block_tensor.append(i)
                block_start.append(start)
        device = locals_[0].device
        as_table = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        self.tables = {"numels": as_table(self.numels), "offsets": as_table(self.offsets),
                       "block_tensor": as_table(block_tensor), "block_start": as_table(block_start)}
        self.theta0 = torch.empty(self.total, dtype=self.dtype, device=device)
        self.g0 = torch.empty(self.total, dtype=self.dtype, device=device)

    @property
    def dtype(self):
        return local(self.params[0]).dtype

    @property
    def device(self):
        return local(self.params[0]).device

    @property
    def num_blocks(self):
        return self.tables["block_tensor"].numel()

    def local_params(self):
        return [local(p) for p in self.params]

    def local_grads(self):
        """Each parameter's local gradient, or None where it got none in this pass."""
        grads = []
        for p in self.params:
            g = None if p.grad is None else local(p.grad)
            if g is not None and (g.dtype != self.dtype or not g.is_contiguous()):
                raise ValueError(f"gradient of a {self.dtype} parameter is {g.dtype}"
                                 f"{'' if g.is_contiguous() else ', non-contiguous'}; the update rules need "
                                 "contiguous gradients of the parameter's dtype")
            grads.append(g)
        return grads

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]].view_as(local(self.params[i]))

    def pointer_table(self, tensors) -> torch.Tensor:
        """int64 data pointers (0 for None), on the group's device."""
        return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64,
                            device=self.device)


def build_groups(params, block: int) -> list[FlatGroup]:
    by_key = {}
    for p in params:
        lp = local(p)
        by_key.setdefault((lp.device, lp.dtype), []).append(p)
    return [FlatGroup(ps, block) for ps in by_key.values()]


class GroupCache:
    """build_groups(params), rebuilt when the parameter set or storage changed (fully_shard after
    construction, a reloaded model)."""

    def __init__(self, block: int):
        self.block, self.groups, self.key = block, None, None

    def get(self, params) -> list[FlatGroup]:
        key = [(id(p), local(p).data_ptr()) for p in params]
        if self.groups is None or key != self.key:
            self.groups, self.key = build_groups(params, self.block), key
        return self.groups
