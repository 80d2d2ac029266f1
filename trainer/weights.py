"""The policy's weights under their plain HF names, one tensor at a time, for a rollout engine to load.

Handles what training wraps around the HF model: FSDP2 shards (gathered with full_tensor, a collective
every rank runs in the same order), activation-checkpoint and torch.compile wrappers in the names, and
peft LoRA (adapters folded into their base weights; the trained model is not modified)."""

from collections.abc import Iterator

import torch

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
PEFT_PREFIX = "base_model.model."


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _clean(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def hf_weight_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every entry of the model's state dict, LoRA merged; lazy, so at most
    one gathered tensor (plus its adapters) is alive at a time."""
    lora_layers = {}
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        lora_layers = {_clean(name): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in model.state_dict().items():
        name = _clean(name)
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            layer_name, _, leaf = name.partition(".base_layer.")
            tensor = _full(tensor)
            layer = lora_layers[layer_name]
            if leaf == "weight":
                tensor = tensor + _lora_delta(layer).to(tensor.dtype)
            name = f"{layer_name}.{leaf}"
        else:
            tensor = _full(tensor)
        yield name.removeprefix(PEFT_PREFIX), tensor


def _lora_delta(layer) -> torch.Tensor:
    """sum over active adapters of scaling * B @ A (peft's merge, computed without touching the layer)."""
    delta = 0
    for adapter in layer.active_adapters:
        a = _full(layer.lora_A[adapter].weight)
        b = _full(layer.lora_B[adapter].weight)
        delta = delta + (b.float() @ a.float()) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta
