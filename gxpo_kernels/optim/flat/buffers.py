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


ALIGN_BYTES = 16
BLOCK = 1024  # elements per block of a group's block map; the rules and a FlatAdamW base share their groups
DEVICE_TABLES_KEPT = 16  # pointer and hyperparameter tables per group (params, 3 passes' grads, moments, ...)


@dataclass
class FlatGroup:
    params: list  # the optimizer's parameters (maybe DTensors) of one device and dtype
    block: int
    numels: list = field(init=False)
    offsets: list = field(init=False)  # each tensor's start in theta0 / g0, 16-byte aligned
    total: int = field(init=False)  # parameters (coordinates) in the group
    flat_size: int = field(init=False)  # elements of theta0 / g0, alignment padding included
    num_full: int = field(init=False)  # blocks of `block` elements wholly inside their tensor (listed first)
    params_aligned: bool = field(init=False)
    _device_tables: dict = field(init=False, default_factory=dict, repr=False)
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
        # Each tensor's segment of theta0 / g0 starts on a 16-byte boundary, so that full blocks move as
        # 128-bit accesses.
        align = ALIGN_BYTES // locals_[0].element_size() if locals_ else 1
        self.offsets = [0] * len(self.numels)
        for i in range(1, len(self.numels)):
            self.offsets[i] = -(-(self.offsets[i - 1] + self.numels[i - 1]) // align) * align
        self.total = sum(self.numels)
        self.flat_size = self.offsets[-1] + self.numels[-1] if self.numels else 0
        full, partial = [], []  # the block map lists full blocks first: their programs need no masks
        for i, n in enumerate(self.numels):
            for start in range(0, n, self.block):
                (full if start + self.block <= n else partial).append((i, start))
        self.num_full = len(full)
        device = locals_[0].device
        as_table = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        self.tables = {"numels": as_table(self.numels), "offsets": as_table(self.offsets),
                       "block_tensor": as_table([t for t, _ in full + partial]),
                       "block_start": as_table([s for _, s in full + partial])}
        self.theta0 = torch.empty(self.flat_size, dtype=self.dtype, device=device)
        self.g0 = torch.empty(self.flat_size, dtype=self.dtype, device=device)
        self.params_aligned = aligned(locals_)

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
        return self.device_table([0 if t is None else t.data_ptr() for t in tensors], torch.int64)

    def device_table(self, values, dtype) -> torch.Tensor:
        """values as a tensor on the group's device, uploaded only the first time these exact values are
        asked for: in steady state the same parameters, gradient buffers and hyperparameters come back, and
        a step uploads nothing."""
        key = (dtype, tuple(values))
        table = self._device_tables.pop(key, None)
        if table is None:
            table = upload(values, dtype, self.device)
        self._device_tables[key] = table  # most recently used last
        while len(self._device_tables) > DEVICE_TABLES_KEPT:
            del self._device_tables[next(iter(self._device_tables))]
        return table


def upload(values, dtype, device) -> torch.Tensor:
    """The one place the update rules copy host values to the device (tests count the calls). On CUDA from
    pinned memory without blocking the host: the copy queues behind the kernels already launched."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def aligned(tensors) -> bool:
    """Every tensor (None counts as aligned) starts on a 16-byte boundary: the kernels may then use
    128-bit accesses on full blocks."""
    return all(t is None or t.data_ptr() % ALIGN_BYTES == 0 for t in tensors)


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
