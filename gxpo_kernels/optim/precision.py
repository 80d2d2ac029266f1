"""Master-weight precision: an adaptive optimizer stepping bf16 (or fp16) parameters loses every update
below the storage resolution. At lr 1e-7 on 0.02-scale weights, ten AdamW steps change about 0.1% of
the entries of a bf16 matrix: the run logs losses and rewards and learns nothing. So low-precision
parameters under an adaptive optimizer are an error unless the caller opts in."""

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
            torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta)


def check_master_dtype(params, optimizer, allow_bf16_params: bool):
    """ValueError when `optimizer` (a class or instance) is adaptive and some parameter is stored in
    bf16 / fp16, unless allow_bf16_params."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    # FlatAdamW is an AdamW; an optimizer of this package says so with adaptive = True (Muon)
    if allow_bf16_params or not (issubclass(cls, ADAPTIVE) or getattr(cls, "adaptive", False)):
        return
    low = sorted({str(p.dtype) for p in params if p.dtype in LOW_PRECISION})
    if low:
        raise ValueError(
            f"parameters stored in {', '.join(low)} under {cls.__name__}: updates below that resolution are lost "
            "(at lr 1e-7 nearly every entry stays put) and the run silently does not learn. Keep fp32 master "
            "parameters and compute in bf16 (FSDP2's MixedPrecisionPolicy, or torch.autocast; the trainer does "
            "this with dtype = \"bfloat16\"), or pass allow_bf16_params=True (trainer: bf16_params = true) if "
            "you want bf16 storage for its memory")

