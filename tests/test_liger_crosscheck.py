"""Same settings, same answer as Liger-Kernel's GRPO losses (where liger-kernel is installed)."""

import pytest
import torch
from helpers import loss_batch, loss_close, rel_err

from gxpo_kernels import fused_linear_grpo_loss, grpo_loss

pytest.importorskip("liger_kernel")
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: E402
from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: E402

LIGER_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
SETTINGS = {"beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "temperature": 0.9}


@pytest.mark.parametrize("loss_agg", list(LIGER_LOSS_TYPE))
def test_grpo_loss_matches_liger_triton(loss_agg):
    B, T, V = 3, 6, 257
    batch = loss_batch(B, T, V, seed=21)
    max_len = T + 2
    ours = batch["logits"].clone().requires_grad_()
    loss, metrics = grpo_loss(ours, batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"],
                              loss_agg=loss_agg, max_completion_len=max_len, **SETTINGS)
    loss.backward()

    # Liger takes the causal LM's [B, T + 1, V] logits and drops the last position itself.
    theirs = torch.cat([batch["logits"], torch.randn(B, 1, V)], dim=1).requires_grad_()
    loss_l, (kl_l, _clip_l) = triton_grpo_loss(
        theirs, batch["old"], batch["ref"], batch["ids"], batch["adv"], batch["mask"].float(),
        temperature=SETTINGS["temperature"], beta=SETTINGS["beta"], eps_low=SETTINGS["eps_low"],
        eps_high=SETTINGS["eps_high"], inplace=False, loss_type=LIGER_LOSS_TYPE[loss_agg],
        max_completion_length=max_len, reduce=True,
    )
    loss_l.backward()
    assert loss_close(loss, loss_l)
    assert rel_err(ours.grad, theirs.grad[:, :-1]) < 1e-5
    assert rel_err(metrics["kl_mean"], kl_l) < 1e-5


def test_fused_linear_matches_liger_chunked():
    B, T, H, V = 3, 5, 16, 97
    batch = loss_batch(B, T, V, seed=22)
    g = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h1, w1, batch["ids"], batch["adv"], batch["mask"], batch["old"],
                                     batch["ref"], **SETTINGS)
    loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger = LigerFusedLinearGRPOLoss(beta=SETTINGS["beta"], compiled=False, epsilon_low=SETTINGS["eps_low"],
                                     epsilon_high=SETTINGS["eps_high"], temperature=SETTINGS["temperature"],
                                     loss_type="dapo")
    out = liger(h2, w2, batch["ids"], batch["mask"].float(), batch["adv"], ref_per_token_logps=batch["ref"],
                old_per_token_logps=batch["old"])
    loss_l = out[0] if isinstance(out, tuple) else out
    loss_l.backward()
    assert loss_close(loss, loss_l)
    assert rel_err(h1.grad, h2.grad) < 1e-5
    assert rel_err(w1.grad, w2.grad) < 1e-5
