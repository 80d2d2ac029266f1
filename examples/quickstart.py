"""The README's quick start, runnable: the loss alone, then GXPO in a loop (a toy policy, seconds on CPU)."""

import torch

from gxpo_kernels import GXPO, fused_linear_grpo_loss

torch.manual_seed(0)
B, T, H, V = 4, 16, 32, 256                                  # completions, tokens, hidden size, vocabulary
body, lm_head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
ids_BT, mask_BT = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)
adv_B = torch.tensor([1.0, -1.0, 0.5, -0.5])                # group-normalized rewards

# The loss alone, fused with the LM head: the [tokens x vocab] logits are never held.
loss, metrics = fused_linear_grpo_loss(body(ids_BT), lm_head.weight, ids_BT, adv_B, mask_BT, return_entropy=True)
loss.backward()

# GXPO in a loop: step() calls the closure for each pass on the same batch (3 while its gate is open).
opt = GXPO([*body.parameters(), *lm_head.parameters()], lr=1e-2, max_grad_norm=1.0)  # the authors' newest preset
for step in range(3):
    def closure():
        loss, metrics = fused_linear_grpo_loss(body(ids_BT), lm_head.weight, ids_BT, adv_B, mask_BT,
                                               return_entropy=True)
        loss.backward()
        return loss, metrics                                  # metrics["entropy_mean"]: the entropy gate's input
    opt.step(closure)
    print(f"step {step}: closure calls so far {opt.backward_passes}, ||g0|| {opt.last_stats['g0_norm']:.4f}, "
          f"mean retention ratio {opt.last_stats['r_mean']:.3f}")
