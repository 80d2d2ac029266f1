"""Model FLOPs utilization: training FLOPs per token by the PaLM accounting (6 N for the weights plus
12 L H S for attention, S the sequence length; fewer with frozen weights) over the device's dense bf16
peak. Only real (unpadded) tokens count."""

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                   "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def train_flops_per_token(model, seq_len: int) -> float:
    """Forward (2 N) + activation gradients (2 N) + weight gradients (2 N_trainable) + attention. N counts
    the matmul weights: all parameters less an untied input embedding (a lookup). DTensor numel() is global."""
    config = model.config
    params = list(model.parameters())
    untied_embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    n_matmul = sum(p.numel() for p in params) - untied_embedding
    n_trainable = min(n_matmul, sum(p.numel() for p in params if p.requires_grad))
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 4 * n_matmul + 2 * n_trainable + attention
