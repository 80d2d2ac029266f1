"""Per-decoder-block options applied before FSDP2 sharding (torchtitan's order): activation
checkpointing (off, full: every block, selective: every other block) and torch.compile of each block."""

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from .distributed import decoder_layers

CHECKPOINTING = ("off", "full", "selective")


def checkpoint_blocks(model, mode: str):
    """Recompute the chosen blocks' activations in the backward (non-reentrant checkpointing)."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    if mode == "off":
        return model
    layers = decoder_layers(model)
    chosen = {id(layer) for i, layer in enumerate(layers) if mode == "full" or i % 2 == 0}
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in chosen)
    return model


def compile_blocks(model):
    """torch.compile each decoder block in place (the model's structure and state-dict keys unchanged)."""
    for layer in decoder_layers(model):
        layer.compile()
    return model
