"""The policy's weights as the rollout engines want them: our names, LoRA merged, or checkpoint names.

`update_weights` accepts any of
- a state dict / an iterable of (name, tensor) with OUR model's names (`model.state_dict()`,
  `model.named_parameters()`; stacked experts `mlp.experts.gate_proj` [E, F, D]);
- our model itself, possibly wrapped (DDP / accelerate `.module`) or a PEFT model: LoRA deltas are
  added to the base weights here, without touching the trainer's model (no merge_adapter /
  unmerge_adapter round trip, so an exception cannot leave the policy merged).

vLLM loads checkpoint names (per-expert `mlp.experts.{e}.gate_proj.weight`): `checkpoint_tensors`
converts with `model.checkpoint.to_hf_state_dict`. ZeRO-3 partitioned parameters must be gathered by
the caller first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from model.checkpoint import to_hf_state_dict

_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate, DeepSpeed
        model = model.module
    return model


def merged_lora_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the base model with every active LoRA adapter added in (W + scale·B·A)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue  # an already merged layer carries its delta in base_layer.weight
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if module.use_dora.get(adapter, False):
                raise NotImplementedError(f"{name}: DoRA adapters cannot be merged for rollout; merge_and_unload first")
            delta = module.get_delta_weight(adapter)
            deltas[name] = deltas[name] + delta if name in deltas else delta
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if any(part in key for part in _LORA_PARTS) or ".original_module." in key:
                continue
            clean = key.replace(".base_layer.", ".")
            if ".modules_to_save." in clean:  # modules_to_save.<adapter>.weight → the trained copy
                head, _, rest = clean.partition(".modules_to_save.")
                clean = head + "." + rest.split(".", 1)[1]
            module_name = clean.rsplit(".", 1)[0]
            if clean.endswith(".weight") and module_name in deltas:
                tensor = tensor + deltas[module_name].to(tensor.dtype)
            out[clean] = tensor.detach()
    return out


def policy_state_dict(source) -> dict[str, torch.Tensor]:
    """Our model's names → detached tensors, from a model (PEFT merged), a mapping or (name, tensor) pairs."""
    if isinstance(source, nn.Module):
        model = _unwrap(source)
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            return merged_lora_state_dict(model)
        return {k: v.detach() for k, v in model.state_dict().items()}
    items = source.items() if isinstance(source, Mapping) else source
    if not isinstance(items, Iterable):
        raise TypeError(f"update_weights takes a model, a state dict or (name, tensor) pairs; got {type(source).__name__}")
    out = {}
    for name, tensor in items:
        if any(part in name for part in _LORA_PARTS):
            raise ValueError(f"{name!r} is a LoRA weight: pass the PEFT model itself so its adapters are merged")
        out[name.removeprefix("module.")] = tensor.detach()
    return out


def checkpoint_tensors(source) -> dict[str, torch.Tensor]:
    """`policy_state_dict` in checkpoint names (what vLLM's weight loader expects), contiguous."""
    return {k: v.contiguous() for k, v in to_hf_state_dict(policy_state_dict(source)).items()}
