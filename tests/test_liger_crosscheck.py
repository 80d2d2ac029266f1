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


# Liger 0.8.5's luspo is TRL's earlier formula, (per_token_loss * mask.sum(1, keepdim=True)).mean() with no mask:
# padding positions count once the per-token loss is [B, T] (token level, KL, token ratios). TRL 1.16 masks first
# (tests/test_objectives_trl.py holds us to it), so luspo meets Liger only at sequence level with no token terms.
LIGER_OBJECTIVE_CASES = [(t, "token", o) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo")
                         for o in ("plain", "delta_kl_rollout")]
LIGER_OBJECTIVE_CASES += [(t, "sequence", o) for t in ("grpo", "bnpo", "dr_grpo", "dapo")
                          for o in ("plain", "delta_kl_rollout")] + [("luspo", "sequence", "plain")]


@pytest.mark.parametrize("loss_type,level,option", LIGER_OBJECTIVE_CASES)
def test_policy_objectives_match_liger_fused_linear(loss_type, level, option):
    """The vocabulary primitive fused with the LM head + policy_loss against Liger 0.8.5's
    LigerFusedLinearGRPOLoss with the same options: loss and both gradients."""
    from gxpo_kernels.loss import PolicyObjective, fused_linear_token_logprobs, policy_loss

    B, T, H, V = 4, 6, 16, 97
    batch = loss_batch(B, T, V, seed=31)
    g = torch.Generator().manual_seed(32)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    extra = option == "delta_kl_rollout"
    rollout = (0.5 + torch.rand((B, 1) if level == "sequence" else (B, T), generator=g)) if extra else None
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04 if extra else 0.0,
              delta=1.5 if extra and loss_type not in ("cispo", "sapo", "vespo") else None,
              epsilon_high=5.0 if loss_type == "cispo" else 0.28, use_bias_correction_kl=extra,
              max_completion_length=T + 2)
    temperature = 0.9
    obj = PolicyObjective(**kw, rollout_correction="token_truncate" if extra else None)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fused_linear_token_logprobs(h1, w1, batch["ids"], batch["mask"], temperature=temperature)
    loss, _ = policy_loss(obj, logp, entropy, batch["adv"], batch["mask"], batch["old"],
                          batch["ref"] if extra else None, rollout_weight=rollout)
    loss.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    liger = LigerFusedLinearGRPOLoss(beta=kw["beta"], compiled=False, use_ref_model=extra, epsilon_low=0.2,
                                     epsilon_high=kw["epsilon_high"], loss_type=loss_type,
                                     max_completion_length=T + 2, importance_sampling_level=level,
                                     temperature=temperature, delta=kw["delta"], use_bias_correction_kl=extra)
    out = liger(h2, w2, batch["ids"], batch["mask"].float(), batch["adv"],
                ref_per_token_logps=batch["ref"] if extra else None, old_per_token_logps=batch["old"],
                vllm_is_ratio=rollout)
    loss_l = out[0] if isinstance(out, tuple) else out
    loss_l.backward()
    assert loss_close(loss, loss_l)
    assert rel_err(h1.grad, h2.grad) < 1e-5
    assert rel_err(w1.grad, w2.grad) < 1e-5
