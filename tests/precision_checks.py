"""The fused LM-head loss against torch in the same low precision, both measured from a float64 run:
|ours - fp64| <= 2 |torch - fp64| + atol (flash-attention's criterion, errors as norms over the tensor).
One comparison for the bf16 GPU test and its CPU twin (fp32 under the interpreter), so neither can rot."""

import torch

from gxpo_kernels import fused_linear_grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference

SETTINGS = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "temperature": 0.9, "return_entropy": True}


def err(x, ref):
    return (x.detach().double() - ref.detach().double()).norm().item()


def leaves(tensors, dtype):
    """Fresh leaves of `dtype`: never the input tensor itself, even where it already has that dtype."""
    return [t.detach().to(dtype).clone().requires_grad_() for t in tensors]


def fused_linear_vs_torch(hidden_BTH, weight_VH, args, settings, impl, low_dtype):
    """(ours, torch in low_dtype, float64) gradients of d_hidden and d_weight; args: ids, adv, mask, old, ref."""
    def grads(fn, dtype):
        h, w = leaves((hidden_BTH, weight_VH), dtype)
        fn(h, w).backward()
        assert h.grad is not None and w.grad is not None
        return h.grad, w.grad

    dbl = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ours = grads(lambda h, w: fused_linear_grpo_loss(h, w, *args, **settings, impl=impl)[0], low_dtype)
    torch_low = grads(lambda h, w: grpo_loss_reference(h @ w.t(), *args, **settings)[0], low_dtype)
    ref = grads(lambda h, w: grpo_loss_reference(h @ w.t(), *dbl, **settings)[0], torch.float64)
    return ours, torch_low, ref


def assert_within_twice_torch(ours, torch_low, ref, atol=1e-6):
    for o, t, r in zip(ours, torch_low, ref, strict=True):
        assert o.data_ptr() != t.data_ptr() and o.data_ptr() != r.data_ptr(), "runs share a gradient tensor"
        assert err(o, r) <= 2 * err(t, r) + atol, (err(o, r), err(t, r))
