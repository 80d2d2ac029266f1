import os

import torch


def uninterpreted_env(**extra) -> dict:
    """This process's environment for a subprocess that runs as a user runs it: without TRITON_INTERPRET
    (which the suite sets for its own kernels), plus extra."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (absolute error when ref is all zeros)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    return ((out - ref).norm() / (denom if denom > 0 else 1)).item()


def loss_close(loss, ref, tol=1e-5, atol=1e-7):
    """A loss is a sum of terms of both signs that can nearly cancel: relative error plus a tiny atol."""
    loss, ref = float(loss.detach()), float(ref.detach())
    return abs(loss - ref) <= tol * abs(ref) + atol


def ragged_mask(B, T, generator, device="cpu"):
    """Right-padded completion mask with lengths from 0 to T (one all-masked row when B > 2)."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    if B > 2:
        lengths[1] = 0
        lengths[2] = T
    return (torch.arange(T)[None, :] < lengths[:, None]).to(device)


def loss_batch(B, T, V, *, seed, device="cpu", dtype=torch.float32, with_old=True, with_ref=True,
               per_token_adv=False):
    """Fresh random inputs for grpo_loss; old/ref log-probs near the policy so ratios straddle the clip."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    adv_shape = (B, T) if per_token_adv else (B,)
    batch = {
        "logits": logits.to(device=device, dtype=dtype),
        "ids": ids.to(device),
        "adv": torch.randn(adv_shape, generator=g, dtype=torch.float64).to(device=device, dtype=torch.float32),
        "mask": ragged_mask(B, T, g, device),
        "old": (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(device, torch.float32)
        if with_old else None,
        "ref": (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(device, torch.float32)
        if with_ref else None,
    }
    return batch
