"""Loss demo (the main job until the trainer lands): GRPO loss from logits and fused with the LM head,
checked against the float64 torch reference, with the metrics a trainer would log."""

import time

import torch

from gxpo_kernels import backend, fused_linear_grpo_loss, grpo_loss
from gxpo_kernels.loss.reference import grpo_loss_reference


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, H, V = (8, 512, 1536, 151936) if device == "cuda" else (4, 32, 64, 2048)
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) / H**0.5
    ids = torch.randint(0, V, (B, T), device=device)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    adv = torch.randn(B, device=device)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "loss_agg": "token-mean", "return_entropy": True}
    path = "Triton (compiled)" if device == "cuda" else ("Triton (interpreter)" if backend.INTERPRET else "torch")
    print(f"device={device} kernel path={path}  B={B} T={T} H={H} V={V}  tokens={int(mask.sum())}")

    # Pass 1 of a GXPO step: on-policy, its log-probs become old_logp for the next passes.
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    t0 = time.perf_counter()
    loss, metrics = fused_linear_grpo_loss(h, w, ids, adv, mask, **kw)
    loss.backward()
    t1 = time.perf_counter()
    print(f"fused_linear_grpo_loss  loss={loss.item():+.6f}  fwd+bwd {1e3 * (t1 - t0):.1f} ms")

    # The same loss from materialized logits, against the float64 reference.
    old = metrics["logp_BT"] + 0.1 * torch.randn(B, T, device=device)
    logits = (hidden @ weight.t()).requires_grad_()
    loss2, metrics2 = grpo_loss(logits, ids, adv, mask, old_logp_BT=old, **kw)
    loss2.backward()
    logits64 = logits.detach().double().requires_grad_()
    ref, _ = grpo_loss_reference(logits64, ids, adv.double(), mask, old.double(), **kw)
    ref.backward()
    rel = ((logits.grad.double() - logits64.grad).norm() / logits64.grad.norm()).item()
    print(f"grpo_loss (off-policy)  loss={loss2.item():+.6f}  float64 ref={ref.item():+.6f}  "
          f"rel. grad error={rel:.2e}")
    for name, value in metrics2.items():
        if value.dim() == 0:
            print(f"  {name:15s} {value.item():.4f}")


if __name__ == "__main__":
    main()
