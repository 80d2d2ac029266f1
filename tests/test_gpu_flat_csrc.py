"""The CUDA flat ops of csrc/flat_ops_cuda.cu against the per-tensor reference and the Triton kernels
(skipped without a GPU or without a CUDA toolkit; `make test-gpu` builds them in place first)."""

import pytest
import torch
from helpers import rel_err
from test_flat_ops import check_extrapolated, check_many_blocks_per_program, g1_like

from gxpo_kernels.optim.flat import native
from gxpo_kernels.optim.flat import ops as flat_ops
from gxpo_kernels.optim.flat.buffers import FlatGroup

pytestmark = pytest.mark.gpu

SIZES = [1, 1023, 1024, 1025, 7, 0, 3000, 100_003]  # around the block (1024), an empty tensor, a large one


@pytest.fixture(params=["csrc", "triton"])
def impl(request, monkeypatch):
    if request.param == "csrc" and not native.HAS_CUDA_CSRC:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is not None:  # setup.py had what it needs: a missing build is a failure
            pytest.fail(f"gxpo_kernels.optim.flat._C has no CUDA kernels although a CUDA toolkit is at {CUDA_HOME}: "
                        "run `make build-ext` (or pip install -e .) and read its errors")
        pytest.skip("no CUDA toolkit (CUDA_HOME): setup.py builds gxpo_kernels.optim.flat._C without its CUDA kernels")
    monkeypatch.setattr(native, "FLAT_CUDA", request.param)
    return request.param


def make_group(dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in SIZES]
    g0 = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in SIZES]
    g0[1][::5] = 0.0
    group = FlatGroup(params, 1024)
    group.theta0.fill_(float("nan"))
    group.g0.fill_(float("nan"))
    return group, params, g0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_restore_grad_dots(impl, dtype):
    group, params, g0 = make_group(dtype, 0)
    assert native.flat_path(group.theta0) == ("cuda_csrc" if impl == "csrc" else "triton")
    grads = [g if i != 2 else None for i, g in enumerate(g0)]
    g0_sq = flat_ops.snapshot(group, grads)
    for i, p in enumerate(params):
        assert torch.equal(group.view(group.theta0, i), p)
        assert torch.equal(group.view(group.g0, i), torch.zeros_like(p) if i == 2 else g0[i])
    present = [g for g in grads if g is not None]
    assert rel_err(g0_sq, sum(g.double().square().sum() for g in present)) < 1e-5
    g1 = [(g.float() * 0.5 + 0.1).to(dtype) for g in g0]
    g1[0] = None
    dots = flat_ops.grad_dots(group, g1, True)
    pairs = [(a, b) for a, b in zip(group_views(group), g1, strict=True) if b is not None]
    assert rel_err(dots[0], sum(b.double().square().sum() for _, b in pairs)) < 1e-5
    assert rel_err(dots[1], sum((a.double() * b.double()).sum() for a, b in pairs)) < 1e-5
    originals = [p.clone() for p in params]
    for p in params:
        p.add_(1.0)
    flat_ops.restore(group)
    assert all(torch.equal(p, o) for p, o in zip(params, originals, strict=True))


def group_views(group):
    return [group.view(group.g0, i) for i in range(len(group.params))]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("K,alpha,g1_scale", [(5, 0.5, 1.0), (2, 1.0, 1.0), (10, 0.3, 0.25)])
def test_extrapolate(impl, dtype, tol, K, alpha, g1_scale):
    group, params, g0 = make_group(dtype, K)
    flat_ops.snapshot(group, g0)
    theta0 = [p.clone() for p in params]
    for p in params:
        p.add_(0.01 * torch.randn_like(p))
    theta2 = [p.clone() for p in params]
    grads = [g.to(dtype) for g in g1_like([x.float().cpu() for x in g0], K + 1)]
    grads = [g.cuda() for g in grads]
    grads[4] = None
    stats = flat_ops.extrapolate(group, grads, K=K, alpha=alpha, delta=1e-8, g1_scale=g1_scale)
    check_extrapolated(params, theta0, theta2, g0, grads, stats, K=K, alpha=alpha, g1_scale=g1_scale, tol=tol,
                       stats_tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("unaligned", ["none", "all", "one"])
def test_many_blocks_per_program_and_unaligned_tensors(impl, unaligned):
    """Several full-block programs of 16 blocks, tails off the 128-bit packs, and tensors 4 bytes past a
    16-byte boundary (the scalar path of their full blocks): none, all, or one."""
    check_many_blocks_per_program(unaligned, "cuda")
