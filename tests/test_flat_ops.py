"""Flat-buffer ops (Triton over pointer tables; interpreter on CPU) against the per-tensor reference."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import rel_err

from gxpo_kernels import backend
from gxpo_kernels.optim.flat import native
from gxpo_kernels.optim.flat import ops as flat_ops
from gxpo_kernels.optim.flat import tiles as flat_tiles
from gxpo_kernels.optim.flat.buffers import FlatGroup
from gxpo_kernels.optim.flat.reference import EXTRAP_STATS, extrapolate_reference, retention_scale

SIZES = [1, 63, 64, 65, 200, 7, 0, 129]  # odd sizes around the block (64), and an empty tensor


def make_group(seed, sizes=SIZES, block=64, special=True):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    g0 = [torch.randn(n, generator=g) for n in sizes]
    if special:
        g0[1][::5] = 0.0  # inactive coordinates
        g0[4][::7] = 1e-9
    group = FlatGroup(params, block)
    group.theta0.fill_(float("nan"))  # poison: every element must be written by snapshot
    group.g0.fill_(float("nan"))
    return group, params, g0


def g1_like(g0, seed, special=True):
    g = torch.Generator().manual_seed(seed)
    g1 = [x * (torch.rand(x.shape, generator=g) * 1.6 - 0.2) + 0.01 * torch.randn(x.shape, generator=g) for x in g0]
    if special:
        g1[3][:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
        g1[4][::3] = g0[4][::3] * 10  # r far outside [-2, 3]
        g1[5][:] = -g0[5]  # r = -1: S_2 = 0, scale falls back to 1
        g1[7][::2] = g0[7][::2]  # r = 1: scale hits its K/2 ... edge
    return g1


@pytest.fixture(params=["triton", "cpp", "torch"])
def ops_path(request, monkeypatch):
    """Triton (interpreter on CPU), the C++ extension, and the torch fallback."""
    if request.param != "triton":
        monkeypatch.setattr(backend, "use_triton", lambda t: False)
    if request.param == "cpp" and not native.HAS_CPP:
        if os.environ.get("GXPO_REQUIRE_CPP") == "1":
            pytest.fail("gxpo_kernels.optim.flat._C was not built (GXPO_REQUIRE_CPP=1)")
        pytest.skip("gxpo_kernels.optim.flat._C not built")
    if request.param == "torch":
        monkeypatch.setattr(native, "use_cpp", lambda t: False)
    assert backend.use_triton(torch.zeros(1)) == (request.param == "triton")
    return request.param


def test_snapshot_and_restore(ops_path):
    group, params, g0 = make_group(0)
    grads = [g if i != 2 else None for i, g in enumerate(g0)]
    g0_sq = flat_ops.snapshot(group, grads)
    for i, p in enumerate(params):
        assert torch.equal(group.view(group.theta0, i), p)
        assert torch.equal(group.view(group.g0, i), torch.zeros_like(p) if i == 2 else g0[i])
    expected = sum(g.double().square().sum() for g in grads if g is not None)
    assert rel_err(g0_sq, expected) < 1e-6
    originals = [p.clone() for p in params]
    for p in params:
        p.add_(1.0)
    flat_ops.restore(group)
    assert all(torch.equal(p, o) for p, o in zip(params, originals, strict=True))


@pytest.mark.parametrize("with_g0", [False, True])
def test_grad_dots(ops_path, with_g0):
    group, params, g0 = make_group(1, special=False)
    flat_ops.snapshot(group, g0)
    g1 = g1_like(g0, 2, special=False)
    g1[0] = None
    dots = flat_ops.grad_dots(group, g1, with_g0)
    present = [(a, b) for a, b in zip(g0, g1, strict=True) if b is not None]
    assert rel_err(dots[0], sum(b.double().square().sum() for _, b in present)) < 1e-6
    expected_dot = sum((a.double() * b.double()).sum() for a, b in present) if with_g0 else torch.tensor(0.0)
    assert rel_err(dots[1], expected_dot) < 1e-6


# K = 7 takes the C++ path's run-time loop; the others its unrolled instantiations
@pytest.mark.parametrize("K,alpha,g1_scale", [(5, 0.5, 1.0), (2, 1.0, 1.0), (10, 0.3, 0.25), (3, 0.8, 2.0),
                                              (7, 0.6, 1.0)])
def test_extrapolate_matches_reference(ops_path, K, alpha, g1_scale):
    group, params, g0 = make_group(K)
    flat_ops.snapshot(group, g0)
    theta0 = [p.clone() for p in params]
    for i, p in enumerate(params):  # theta2: somewhere near theta0
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    theta2 = [p.clone() for p in params]
    grads = g1_like(g0, K + 1)
    grads[6] = None
    stats = flat_ops.extrapolate(group, grads, K=K, alpha=alpha, delta=1e-8, g1_scale=g1_scale)

    check_extrapolated(params, theta0, theta2, g0, grads, stats, K=K, alpha=alpha, g1_scale=g1_scale, tol=1e-6,
                       stats_tol=1e-6)
    assert not torch.isfinite(stats[EXTRAP_STATS.index("g1_sq")])  # the inf entries reach the norm
    assert stats[EXTRAP_STATS.index("n_clipped")] > 0


def check_extrapolated(params, theta0, theta2, g0, grads, stats, *, K, alpha, g1_scale, tol, stats_tol):
    """params and stats after flat_ops.extrapolate against the float64 per-tensor reference."""
    rows = []
    for i, p in enumerate(params):
        g1 = torch.zeros_like(p) if grads[i] is None else grads[i] * g1_scale
        ref, row = extrapolate_reference(theta0[i].double(), theta2[i].double(), g0[i].double(), g1.double(),
                                         K=K, alpha=alpha)
        assert torch.isfinite(p).all()
        if p.numel():
            assert rel_err(p, ref) < tol, i
        rows.append(row)
    ref_stats = flat_ops.combine_stats(torch.stack(rows))
    finite = [i for i, name in enumerate(EXTRAP_STATS) if name not in ("g1_sq", "g0_g1")]
    assert rel_err(stats[finite].cpu(), ref_stats[finite].cpu()) < stats_tol
    assert stats[EXTRAP_STATS.index("n_clipped")] > 0


def test_retention_scale_rules():
    """The clamp and fallback rules of docs/algorithm.md, step 3, coordinate by coordinate."""
    g0 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -2.0, 0.0, 1e-9, 1.0], dtype=torch.float64)
    g1 = torch.tensor([0.5, 10.0, -5.0, float("nan"), float("inf"), 1.0, 3.0, 1.0, -1.0], dtype=torch.float64)
    scale, r, active, clipped = retention_scale(g0, g1, K=5, delta=1e-8)
    assert r.tolist()[:6] == [0.5, 3.0, -2.0, 1.0, 3.0, -0.5]
    assert active.tolist() == [True] * 6 + [False, False, True]
    assert clipped.tolist() == [False, True, True, True, True, False, False, False, False]
    s = lambda x, n: sum(x**i for i in range(n))  # noqa: E731
    assert scale[0].item() == pytest.approx(s(0.5, 5) / s(0.5, 2))
    assert scale[1].item() == 3.5  # S_5(3) / S_2(3) = 121 / 4, clamped to K/2 + 1
    assert scale[3].item() == pytest.approx(2.5)  # NaN -> r = 1: S_5 / S_2 = 5 / 2
    assert scale[6].item() == 1.0 and scale[7].item() == 1.0  # inactive
    assert scale[8].item() == 1.0  # r = -1: |S_2| <= delta -> 1


def test_flat_cuda_choice_is_validated():
    with pytest.raises(ValueError, match="'triton' or 'csrc'"):
        with native.flat_cuda("cuda"):
            pass
    env = {**os.environ, "GXPO_FLAT_CUDA": "cublas"}
    done = subprocess.run([sys.executable, "-c", "import gxpo_kernels"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "GXPO_FLAT_CUDA='cublas'" in done.stderr
    with native.flat_cuda("csrc"):
        assert native.flat_path(torch.zeros(1)) in ("triton", "cpp")  # CPU tensors never take the CUDA kernels
    assert native.FLAT_CUDA == "triton"


@pytest.mark.parametrize("alpha", [0.8, 1.0, 0.3])
def test_interpolate_is_sfpos_partial_move(ops_path, alpha):
    group, params, g0 = make_group(11)
    flat_ops.snapshot(group, g0)  # g0 has zeros and tiny entries: every coordinate must still move by alpha
    theta0 = [p.clone() for p in params]
    for i, p in enumerate(params):
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)))
    theta_k = [p.clone() for p in params]
    d_sq = flat_ops.interpolate(group, alpha=alpha)
    for p, t0, tk in zip(params, theta0, theta_k, strict=True):
        expected = t0.double() + alpha * (tk.double() - t0.double())
        if p.numel():
            assert rel_err(p, expected) < 1e-6
    assert rel_err(d_sq, sum((tk.double() - t0.double()).square().sum() for t0, tk in zip(theta0, theta_k,
                                                                                              strict=True))) < 1e-6


@pytest.mark.parametrize("unaligned", ["none", "all", "one"])
def test_many_blocks_per_program_and_unaligned_tensors(ops_path, unaligned):
    check_many_blocks_per_program(unaligned, "cpu")


def check_many_blocks_per_program(unaligned, device):
    """More full blocks than one program walks (so several full-block programs), tails that are not a
    multiple of 4, and tensors that start 4 bytes past a 16-byte boundary: none, all, or one (whose programs
    take the 32-bit path while the others keep the 128-bit one)."""
    sizes = [64 * (flat_tiles.BLOCKS_PER_PROGRAM + 21) + 5, 3, 64 * 20, 66]
    g = torch.Generator().manual_seed(31)
    shifted = {"none": [], "all": range(len(sizes)), "one": [2]}[unaligned]
    params = [torch.randn(n + 1, generator=g).to(device)[1:] if i in shifted
              else torch.randn(n, generator=g).to(device) for i, n in enumerate(sizes)]
    g0 = [torch.randn(n, generator=g).to(device) for n in sizes]
    group = FlatGroup(params, 64)
    assert group.params_aligned == (unaligned == "none") and flat_tiles.num_programs(group) > 3
    assert all(o % 4 == 0 for o in group.offsets)
    group.theta0.fill_(float("nan"))
    group.g0.fill_(float("nan"))
    g0_sq = flat_ops.snapshot(group, g0)
    assert rel_err(g0_sq, sum(x.double().square().sum() for x in g0)) < 1e-6
    assert all(torch.equal(group.view(group.theta0, i), p) for i, p in enumerate(params))
    theta0 = [p.clone() for p in params]
    for i, p in enumerate(params):
        p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(40 + i)).to(device))
    theta2 = [p.clone() for p in params]
    grads = [x.to(device) for x in g1_like([x.cpu() for x in g0], 32, special=False)]
    dots = flat_ops.grad_dots(group, grads, with_g0=True)
    assert rel_err(dots[1], sum((a.double() * b.double()).sum() for a, b in zip(g0, grads, strict=True))) < 1e-6
    grads[0][7] = float("inf")  # one clipped ratio, so the check's n_clipped > 0 holds
    stats = flat_ops.extrapolate(group, grads, K=3, alpha=0.5, delta=1e-8)
    check_extrapolated(params, theta0, theta2, g0, grads, stats, K=3, alpha=0.5, g1_scale=1.0, tol=1e-6,
                       stats_tol=1e-6)
