"""`gxpo-bench kernels`: each kernel against its alternatives at the issues' shapes, with the floor for
that shape (bytes over the measured copy bandwidth, FLOPs over the measured matmul rate; the larger).

Cases: the GRPO loss from logits (ours, Liger's Triton kernel, torch eager, torch.compile of the
reference), the loss fused with the LM head (ours, ours on materialized logits, Liger's chunked
LigerFusedLinearGRPOLoss, eager, compile), CAPO's per-token scores (ours: chunked logits and the
gathered-quadratic kernel, vs the per-token gradients materialized), one AdamW step (ours: one launch
per dtype group, also with GXPO's snapshot fused in; torch foreach and fused) and GXPO's bookkeeping per
active step (our flat ops vs the per-tensor torch implementation). On CPU "ours" is the torch fallback for
the losses and CAPO, and the C++ extension for the bookkeeping; Triton's interpreter is never timed."""

import math
from functools import partial

import torch

from gxpo_kernels import backend, fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference
from gxpo_kernels.optim.flat import native
from gxpo_kernels.optim.flat import ops as flat_ops
from gxpo_kernels.optim.flat.buffers import BLOCK, build_groups
from gxpo_kernels.optim.flat_adamw import FlatAdamW
from trainer.plugins.capo.kernels import capo_scores, top_rows

from . import shapes
from .per_tensor import bookkeeping as per_tensor_bookkeeping

KW = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "temperature": 1.0}
# snapshot r/w 16, ||g1|| 4, extrapolation 20, <g0, g~> and ||g~|| 8 (bench/README.md)
BOOKKEEPING_BYTES_PER_PARAM = 48


def liger_triton(logits, ids, adv, mask, old, ref):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    # Liger scores logits[:, :-1]; it gets the causal LM's [B, T + 1, V] view.
    return triton_grpo_loss(logits, old, ref, ids, adv, mask.float(), temperature=KW["temperature"],
                            beta=KW["beta"], eps_low=KW["eps_low"], eps_high=KW["eps_high"], inplace=True,
                            loss_type="dapo", reduce=True)[0]


def liger_fused(hidden, weight, ids, adv, mask, old, ref, compiled=True):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=KW["beta"], compiled=compiled, epsilon_low=KW["eps_low"],
                                    epsilon_high=KW["eps_high"], temperature=KW["temperature"], loss_type="dapo")
    out = loss(hidden, weight, ids, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
    return out[0] if isinstance(out, tuple) else out


def loss_impls(cuda: bool, compile_: bool) -> dict:
    """name -> loss(logits [B, T + 1, V], ids, adv, mask, old, ref); None marks a skipped alternative."""
    compiled = torch.compile(grpo_loss_reference, dynamic=False) if compile_ else None
    return {
        "ours": lambda x, *a: grpo_loss(x[:, :-1], *a, **KW, inplace=True)[0],
        "ours_not_inplace": lambda x, *a: grpo_loss(x[:, :-1], *a, **KW)[0],
        "liger": liger_triton if cuda and _has_liger() else None,
        "torch_eager": lambda x, *a: grpo_loss_reference(x[:, :-1], *a, **KW)[0],
        "torch_compile": (lambda x, *a: compiled(x[:, :-1], *a, **KW)[0]) if compiled else None,
    }


def linear_impls(compile_: bool) -> dict:
    """name -> loss(hidden [B, T, H], weight [V, H], ids, adv, mask, old, ref)."""
    compiled = torch.compile(grpo_loss_reference, dynamic=False) if compile_ else None
    return {
        "ours": lambda h, w, *a: fused_linear_grpo_loss(h, w, *a, **KW)[0],  # tiled where Triton runs
        "ours_chunked": (lambda h, w, *a: fused_linear_grpo_loss(h, w, *a, **KW, impl="chunked")[0])
        if backend.use_triton(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")) else None,
        "ours_filtered": (lambda h, w, *a: fused_linear_grpo_loss(h, w, *a, **KW, filter_eps=2.0**-12)[0])
        if torch.cuda.is_available() else None,
        "ours_materialized": lambda h, w, *a: grpo_loss(h @ w.t(), *a, **KW, inplace=True)[0],
        "liger": (lambda h, w, *a: liger_fused(h, w, *a, compiled=compile_)) if _has_liger() else None,
        "torch_eager": lambda h, w, *a: grpo_loss_reference(h @ w.t(), *a, **KW)[0],
        "torch_compile": (lambda h, w, *a: compiled(h @ w.t(), *a, **KW)[0]) if compiled else None,
    }


def capo_materialized(hidden, weight, actions, adv, precond, lr, top_k):
    """CAPO's scores as the published code computes them: per-token LM-head gradients [N, K, H] (and
    their preconditioned steps) materialized, in the inputs' dtype."""
    rows, pi, onehot = top_rows(hidden @ weight.t(), actions, top_k, 1.0)
    v = (onehot - pi).to(hidden.dtype)
    g = adv[:, None, None] * v[:, :, None] * hidden[:, None, :]
    delta = g * precond[rows]
    u = torch.einsum("nkh,nh->nk", delta, hidden).float()
    vu = (v.float() * u).sum(1)
    curvature = (pi * u.square()).sum(1) - (pi * u).sum(1).square()
    m_H = lr * (g * delta).float().sum((1, 2)) + 0.5 * lr**2 * adv.float() * (vu.square() - curvature)
    return m_H, 0.5 * lr**2 * vu.square()


def ours_bookkeeping(groups, g0, g1, gt, K=5, alpha=0.5):
    """Everything an active GXPO step does besides the three closures and three base steps."""
    group = groups[0]
    flat_ops.snapshot(group, g0)
    flat_ops.grad_dots(group, g1, False).tolist()
    flat_ops.extrapolate(group, g1, K=K, alpha=alpha, delta=1e-8).tolist()
    flat_ops.grad_dots(group, gt, True).tolist()


def csrc_cuda_bookkeeping(groups, g0, g1, gt):
    """ours_bookkeeping with the CUDA kernels of csrc/ instead of Triton."""
    with native.flat_cuda("csrc"):
        ours_bookkeeping(groups, g0, g1, gt)


def _adamw_case(size: str, device, dtype, cuda: bool, compile_):
    """One AdamW step over a model's fp32 parameters: ours (one Triton launch per dtype group; with the
    GXPO pass-1 snapshot written in the same pass) vs torch's foreach and fused AdamW."""
    g = torch.Generator(device=device).manual_seed(0)
    param_shapes = shapes.model_shapes(*shapes.MODELS[size])
    n = sum(math.prod(s) for s in param_shapes)

    def optimizer(kind):
        params = [torch.randn(s, device=device, generator=g).requires_grad_() for s in param_shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=g)
        if kind == "ours":
            return FlatAdamW(params, lr=1e-4), None
        if kind == "ours_with_snapshot":
            return FlatAdamW(params, lr=1e-4), build_groups(params, BLOCK)
        return torch.optim.AdamW(params, lr=1e-4, **{kind.removeprefix("torch_"): True}), None

    impls = {}
    for kind in ADAMW_IMPLS:
        if kind.startswith("ours") and not cuda:
            impls[kind] = None  # the kernel is Triton: on CPU only the interpreter, never timed
            continue
        opt, snap = optimizer(kind)
        impls[kind] = ((partial(opt.step, snapshot_groups=snap) if snap else opt.step), tuple)
    # read p, g, m, v and write p, m, v: 28 B/param (fp32); the snapshot adds 8
    return impls, 28 * n, 0


def _has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _loss_case(N, V, device, dtype, cuda, compile_):
    ids, adv, mask, old, ref = shapes.loss_inputs(N, V, device)
    B, T = ids.shape

    def setup():
        return (torch.randn(B, T + 1, V, device=device, dtype=dtype).requires_grad_(),)

    impls = {name: None if f is None else ((lambda x, f=f: f(x, ids, adv, mask, old, ref).backward()), setup)
             for name, f in loss_impls(cuda, compile_).items()}
    # logits read by the forward, read again and overwritten with the gradient by the backward
    return impls, 3 * (torch.finfo(dtype).bits // 8) * B * T * V, 0


def _linear_case(N, H, V, device, dtype, cuda, compile_):
    ids, adv, mask, old, ref = shapes.loss_inputs(N, V, device)
    B, T = ids.shape
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()

    def setup():
        weight.grad = None
        return torch.randn(B, T, H, device=device, dtype=dtype).requires_grad_(), weight

    impls = {name: None if f is None else ((lambda h, w, f=f: f(h, w, ids, adv, mask, old, ref).backward()), setup)
             for name, f in linear_impls(compile_).items()}
    # logits, d_hidden and d_weight: three N x H x V products; read h, W; write dh, dW
    return impls, 2 * (torch.finfo(dtype).bits // 8) * (N * H + V * H), 6 * N * H * V


def _capo_case(N, H, V, K, device, dtype, cuda, compile_):
    args = shapes.capo_inputs(N, H, V, device, dtype)
    impls = {"ours": (partial(capo_scores, *args, top_k=K), tuple),
             "materialized": (partial(capo_materialized, *args, top_k=K), tuple)}
    # the logits (2 N H V) dominate; read hidden and the head once, K precond rows per token
    return impls, (torch.finfo(dtype).bits // 8) * (N * H + V * H + N * K * H), 2 * N * H * V


def _bookkeeping_case(size, device, dtype, cuda, compile_):
    g = torch.Generator(device=device).manual_seed(0)
    param_shapes = shapes.model_shapes(*shapes.MODELS[size])
    params = [torch.randn(s, device=device, generator=g) for s in param_shapes]
    g0, g1, gt = ([torch.randn(s, device=device, generator=g) for s in param_shapes] for _ in range(3))
    groups = build_groups(params, BLOCK)
    ours_ok = cuda or native.HAS_CPP
    impls = {"ours": (partial(ours_bookkeeping, groups, g0, g1, gt), tuple) if ours_ok else None,
             "per_tensor": (partial(per_tensor_bookkeeping, params, g0, g1, gt), tuple)}
    if cuda:
        impls["csrc_cuda"] = (partial(csrc_cuda_bookkeeping, groups, g0, g1, gt), tuple) \
            if native.HAS_CUDA_CSRC else None
    return impls, BOOKKEEPING_BYTES_PER_PARAM * sum(p.numel() for p in params), 0


def _model_label(size: str) -> str:
    n = sum(math.prod(s) for s in shapes.model_shapes(*shapes.MODELS[size]))
    return f"{size} model ({n / 1e6:.1f}M fp32 params)"


ADAMW_IMPLS = ("ours", "ours_with_snapshot", "torch_foreach", "torch_fused")


def case_list(device: torch.device, fast: bool) -> list:
    """(case, shape, impl names, build) for every benchmark; build(device, dtype, cuda, compile_) makes its
    inputs only when called: ({impl: (fn, setup) or None}, bytes moved, flops)."""
    cuda = device.type == "cuda"
    loss, linear = list(loss_impls(cuda, False)), list(linear_impls(False))
    bookkeeping = ["ours", "per_tensor"] + ["csrc_cuda"] * cuda
    out = [("grpo_loss", f"N={N} V={V}", loss, partial(_loss_case, N, V)) for N, V in shapes.loss_shapes(cuda, fast)]
    out += [("fused_linear_grpo_loss", f"N={N} H={H} V={V}", linear, partial(_linear_case, N, H, V))
            for N, H, V in shapes.linear_shapes(cuda, fast)]
    out += [("capo_scores", f"N={N} H={H} V={V} K={K}", ["ours", "materialized"], partial(_capo_case, N, H, V, K))
            for N, H, V, K in shapes.capo_shapes(cuda, fast)]
    out += [("adamw_step", _model_label(size), list(ADAMW_IMPLS), partial(_adamw_case, size))
            for size in shapes.model_sizes(cuda, fast)]
    out += [("gxpo_bookkeeping", _model_label(size), bookkeeping, partial(_bookkeeping_case, size))
            for size in shapes.model_sizes(cuda, fast)]
    return out


def cases(device: torch.device, dtype: torch.dtype, fast: bool, compile_: bool):
    """Yields (case, shape, {impl: (fn, setup) or None}, bytes_moved, flops) for every benchmark, building
    each case's inputs as it comes."""
    cuda = device.type == "cuda"
    for case, shape, _, build in case_list(device, fast):
        impls, nbytes, flops = build(device, dtype, cuda, compile_)
        yield case, shape, impls, nbytes, flops
