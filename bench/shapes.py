"""Benchmark shapes: the issue's GPU shapes on CUDA, small ones on CPU so `make bench` stays quick."""

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (tokens N = B * T, vocabulary V)
LOSS_SHAPES = [(4096, 32000), (4096, 151936), (16384, 32000), (16384, 151936)] if CUDA else [(512, 8192)]
# (tokens N, hidden H, vocabulary V)
LINEAR_SHAPES = ([(4096, 1536, 151936), (16384, 1536, 151936), (16384, 3584, 151936), (16384, 3584, 32000)]
                 if CUDA else [(512, 256, 8192)])
SEQ_LEN = 1024 if CUDA else 64


def loss_inputs(N, V, seed=0):
    """Right-padded batch with ~25% padding, fresh advantages, old/ref log-probs near the policy."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B, T = N // SEQ_LEN, SEQ_LEN
    ids = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), device=DEVICE, generator=g)
    mask = torch.arange(T, device=DEVICE)[None] < lengths[:, None]
    adv = torch.randn(B, device=DEVICE, generator=g)
    old = -torch.rand(B, T, device=DEVICE, generator=g) * 10
    ref = old + 0.01 * torch.randn(B, T, device=DEVICE, generator=g)
    return ids, adv, mask, old, ref
