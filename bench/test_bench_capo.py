"""CAPO's per-token scores: ours (chunked logits + the gathered-quadratic kernel) vs the per-token
LM-head gradients materialized as the published code does (gxpo_bench.kernels.capo_materialized)."""

from functools import partial

import pytest
from shapes import CUDA, DEVICE, DTYPE

from gxpo_bench.kernels import capo_materialized
from gxpo_bench.shapes import capo_inputs, capo_shapes
from gxpo_kernels.ops.capo import capo_scores

SHAPES = capo_shapes(CUDA, fast=False)
IMPLS = {"ours": capo_scores, "materialized": capo_materialized}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("N,H,V,K", SHAPES, ids=[f"N{n}-H{h}-V{v}-K{k}" for n, h, v, k in SHAPES])
def test_capo_scores(measure, benchmark, impl, N, H, V, K):
    benchmark.group = f"capo_scores N={N} H={H} V={V} K={K}"
    measure(partial(IMPLS[impl], *capo_inputs(N, H, V, DEVICE, DTYPE), top_k=K), tuple)
