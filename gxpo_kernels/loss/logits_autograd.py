"""The autograd layer of the loss from logits (GRPOLossFunction), and the saved-gradient helpers the LM-head
Functions share."""

import torch

from .. import backend
from .logits_kernels import triton_pass1, triton_pass2
from .rows import torch_rows


def take_saved_grads(ctx, what: str):
    """The gradients a loss Function computed in its forward, handed out once."""
    grads, ctx.saved_grads = ctx.saved_grads, None
    if grads is None:
        raise RuntimeError(f"{what}: backward ran twice; the gradient buffers were already handed out. "
                           "Recompute the loss for another backward.")
    return grads


def scale_grad_(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """grad * grad_output, in place; on an accelerator without a host sync (grad_output stays on the
    device), on CPU skipped when grad_output is 1."""
    if grad is None or (grad_output.device.type == "cpu" and bool(grad_output == 1)):
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


PASS2_IN_BACKWARD = object()  # the Triton path's saved "gradient": pass 2 runs in the backward


class GRPOLossFunction(torch.autograd.Function):
    """Triton: the forward reads the logits once (statistics, lse, row coefficients); the backward reads
    them again and writes dlogits with grad_output folded into each row's coefficient. Torch path: the
    gradient is computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, inplace, block_v):
        need_grad = ctx.needs_input_grad[0]
        ctx.cfg, ctx.inplace, ctx.block_v, ctx.saved_grads = cfg, inplace, block_v, None
        if backend.use_triton(logits_BTV):
            stats, coef_N, lse_N = triton_pass1(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, block_v)
            if need_grad:
                ctx.save_for_backward(logits_BTV, ids_N, coef_N, lse_N)
                ctx.saved_grads = PASS2_IN_BACKWARD
        else:
            stats, ctx.saved_grads = torch_rows(logits_BTV, ids_N, adv_N, weight_N, old_N, ref_N, cfg, need_grad)
        ctx.mark_non_differentiable(stats)
        return (weight_N.to(stats.dtype) * stats[0]).sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        saved = take_saved_grads(ctx, "grpo_loss")
        if saved is PASS2_IN_BACKWARD:
            logits_BTV, ids_N, coef_N, lse_N = ctx.saved_tensors
            grad_out = grad_loss.reshape(1).to(torch.float32)
            dlogits = triton_pass2(logits_BTV, ids_N, coef_N, lse_N, grad_out, ctx.cfg, ctx.inplace, ctx.block_v)
        else:
            dlogits = scale_grad_(saved, grad_loss)
        return dlogits, None, None, None, None, None, None, None, None
