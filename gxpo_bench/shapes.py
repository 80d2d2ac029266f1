"""Benchmark shapes and inputs: the issues' GPU shapes on CUDA, small ones on CPU, tiny ones for --fast."""

import torch


def loss_shapes(cuda: bool, fast: bool) -> list:
    """(tokens N = B * T, vocabulary V) for the loss from logits."""
    if fast:
        return [(1024, 32000)] if cuda else [(128, 2048)]
    return [(4096, 32000), (4096, 151936), (16384, 32000), (16384, 151936)] if cuda else [(512, 8192)]


def linear_shapes(cuda: bool, fast: bool) -> list:
    """(tokens N, hidden H, vocabulary V) for the loss fused with the LM head."""
    if fast:
        return [(1024, 1536, 32000)] if cuda else [(128, 128, 2048)]
    return ([(4096, 1536, 151936), (16384, 1536, 151936), (16384, 3584, 151936), (16384, 3584, 32000)]
            if cuda else [(512, 256, 8192)])


def capo_shapes(cuda: bool, fast: bool) -> list:
    """(tokens N, hidden H, vocabulary V, top K): the issue's B=32 x T=1024, H=1536 on GPU."""
    if fast:
        return [(4096, 1536, 32000, 50)] if cuda else [(64, 64, 2048, 16)]
    return [(32768, 1536, 151936, 50)] if cuda else [(512, 256, 8192, 50)]


# (hidden, intermediate, layers, vocab): SmolLM2-135M and Qwen2.5-1.5B parameter shapes, and smaller
# models of the same layout for CPU.
MODELS = {"tiny": (64, 192, 4, 2048), "14M": (256, 768, 12, 16384), "135M": (576, 1536, 30, 49152),
          "1.5B": (1536, 8960, 28, 151936)}


def model_sizes(cuda: bool, fast: bool) -> list:
    if fast:
        return ["14M"] if cuda else ["tiny"]
    return ["135M", "1.5B"] if cuda else ["14M"]


def model_shapes(hidden, inter, layers, vocab) -> list:
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return [(vocab, hidden)] + per_layer * layers + [(hidden,)]


def seq_len(N: int) -> int:
    return min(1024, N // 4)


def loss_inputs(N, V, device, seed=0):
    """Right-padded batch with ~25% padding, fresh advantages, old/ref log-probs near the policy."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = seq_len(N)
    B = N // T
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]
    adv = torch.randn(B, device=device, generator=g)
    old = -torch.rand(B, T, device=device, generator=g) * 10
    ref = old + 0.01 * torch.randn(B, T, device=device, generator=g)
    return ids, adv, mask, old, ref


def capo_inputs(N, H, V, device, dtype, seed=0):
    """(hidden, LM head, sampled tokens, advantages, preconditioner, lr) for capo_scores."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    actions = torch.randint(0, V, (N,), device=device, generator=g)
    adv = torch.randn(N, device=device, generator=g).to(dtype)
    precond = (1 / (torch.rand(V, H, device=device, generator=g).sqrt() + 1e-3)).to(dtype)
    return hidden, weight, actions, adv, precond, 1e-6
