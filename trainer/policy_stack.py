"""The policy and what wraps it, built once for the trainer and the benchmarks alike: load, Liger's patches,
the frozen reference copy, LoRA, activation checkpointing, compile, FSDP2 sharding (its mixed-precision
policy, on a one-rank mesh when there is one device) and the update rule over the trainable parameters."""

import copy
from dataclasses import dataclass

import torch

from .blocks import checkpoint_blocks, compile_blocks
from .closure import kl_beta, make_update_rule
from .config import TrainConfig
from .distributed import init_single_rank_group, shard_policy
from .models import apply_liger_patches, apply_lora, load_policy
from .policy import PolicyRunner


def stack_dtypes(cfg: TrainConfig, device: torch.device) -> tuple:
    """(parameter storage dtype, compute dtype). Parameters and optimizer state are fp32 masters unless
    bf16_params opts in; compute is bf16 on GPU and fp32 on CPU unless dtype names one."""
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    compute = compute or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return (torch.bfloat16 if cfg.bf16_params else torch.float32), compute


@dataclass
class PolicyStack:
    model: torch.nn.Module  # the trained module (LoRA-wrapped when lora is on)
    tokenizer: object
    runner: PolicyRunner  # its forward and loss entry points (the FSDP2 root when sharded)
    ref_runner: PolicyRunner | None  # the frozen reference policy (when closure.kl_beta > 0), sharded alike
    rule: torch.optim.Optimizer | None  # the configured update rule over the trainable parameters
    own_group: bool  # a one-rank process group was created here: the caller destroys it at the end


def build_policy_stack(cfg: TrainConfig, device: torch.device, world: int = 1, reference: bool | None = None,
                       with_rule: bool = True) -> PolicyStack:
    """reference: build the reference copy (default: when closure.kl_beta(cfg) > 0). Mixed precision is FSDP2's
    policy on every world size: bf16 copies for compute, fp32 masters for the optimizer, the same numerics on 1 GPU
    as on 8."""
    param_dtype, compute_dtype = stack_dtypes(cfg, device)
    shard = world > 1 or compute_dtype != param_dtype
    own_group = bool(shard and world == 1 and init_single_rank_group(device))
    model, tokenizer = load_policy(cfg.model, param_dtype, cfg.seed, cfg.attn_implementation)
    model.to(device)
    if cfg.liger_patches:
        apply_liger_patches(model)
    with_reference = kl_beta(cfg) > 0 if reference is None else reference
    ref_runner = PolicyRunner(copy.deepcopy(model).eval().requires_grad_(False)) if with_reference else None
    model = apply_lora(model, cfg.lora)
    checkpoint_blocks(model, cfg.activation_checkpointing)
    if cfg.compile:
        compile_blocks(model)
    runner = PolicyRunner(model)
    if shard:
        mixed = compute_dtype if compute_dtype != param_dtype else None
        for r in filter(None, (runner, ref_runner)):
            shard_policy(r, mixed)
    named = [(n, p) for n, p in runner.named_parameters() if p.requires_grad]  # Muon keeps embeddings on AdamW by name
    rule = make_update_rule(cfg, named) if with_rule else None
    return PolicyStack(model, tokenizer, runner, ref_runner, rule, own_group)
