"""The `flash` extra on a GPU: packed micro-batches through flash-attention 2's varlen path (transformers reads
the restarting position ids) give the padded batch's loss and gradients. Criterion as in test_gpu_bf16: the
packed bf16 flash run is within 2x the padded bf16 sdpa run's error against a float32 padded reference, plus a
floor. Skipped without CUDA, or without flash-attn installed (make gpu-check runs it where it imports)."""

import pytest
import torch
from helpers import rel_err

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")
from test_packing import grads_after_closure  # noqa: E402


@pytest.fixture(autouse=True)
def flash_attn():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return pytest.importorskip("flash_attn", reason="flash-attn is not installed (the `flash` extra)")


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_packed_flash_attention_equals_padded(loss_agg):
    loss_ref, _, g_ref, _ = grads_after_closure(loss_agg, "sdpa", torch.float32, "cuda", pack=False)
    loss_sdpa, _, g_sdpa, _ = grads_after_closure(loss_agg, "sdpa", torch.bfloat16, "cuda", pack=False)
    loss_flash, _, g_flash, closure = grads_after_closure(loss_agg, "flash_attention_2", torch.bfloat16, "cuda",
                                                          pack=True)
    assert len(closure.micro_batches) == 1  # one packed stream: the varlen path, not padding
    floor = 2e-2
    assert abs(loss_flash.item() - loss_ref.item()) <= 2 * abs(loss_sdpa.item() - loss_ref.item()) + floor * abs(
        loss_ref.item()) + 1e-4
    for name in g_ref:
        assert rel_err(g_flash[name], g_ref[name]) <= 2 * rel_err(g_sdpa[name], g_ref[name]) + floor, name
