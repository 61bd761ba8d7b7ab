"""Hugging Face deepseek_v2 checkpoints: config.json + safetensors (single file or sharded with an
index), per-expert key names (`mlp.experts.{e}.gate_proj.weight`). Safetensors only: no pickle, no
remote code. Missing, unexpected and mis-shaped keys raise an error naming the key.

In memory the routed experts are stacked ([E, F, D] per projection, model/moe.py); this module
splits them on save, and `RoutedExperts`' load hook stacks them (also from transformers' fused
`gate_up_proj` layout) on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DeepseekV2Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.gate_up_proj$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or key."""


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → checkpoint names: stacked experts become per-expert `.weight` keys."""
    out = {}
    for name, tensor in state_dict.items():
        match = _STACKED.match(name)
        if match and tensor.dim() == 3:
            for e in range(tensor.shape[0]):
                out[f"{match['prefix']}.{e}.{match['proj']}.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused `experts.gate_up_proj` [E, 2F, D] → our gate_proj / up_proj (per-expert keys
    are stacked by the module's load hook)."""
    out = {}
    for name, tensor in state_dict.items():
        match = _FUSED.match(name)
        if match:
            gate, up = tensor.chunk(2, dim=1)
            out[match["prefix"] + ".gate_proj"], out[match["prefix"] + ".up_proj"] = gate, up
        else:
            out[name] = tensor
    return out


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or index + shards)."""
    path = Path(path)
    if (path / INDEX_FILE).exists():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        hint = " (pickled .bin weights are not loaded: convert them to safetensors)" if any(
            f.endswith((".bin", ".pt")) for f in found) else ""
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; found {found}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(path / file), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as err:  # safetensors raises several types for truncated / corrupt files
            raise CheckpointError(f"{path / file}: unreadable safetensors file ({err})") from err
    return tensors


def load_pretrained(cls, path, *, dtype="auto", device=None, **config_overrides):
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "deepseek_v2":
        raise CheckpointError(f"{config_file}: model_type is {raw.get('model_type')!r}, expected 'deepseek_v2'")
    config = DeepseekV2Config.from_pretrained(str(path), **config_overrides)
    tensors = from_hf_state_dict(read_safetensors(path))
    if dtype == "auto":
        float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v for k, v in model.state_dict().items()}
    # Check names and shapes in checkpoint naming so that errors name keys as they are on disk.
    expected_hf = to_hf_state_dict(expected)
    given_hf = to_hf_state_dict(tensors)
    missing = sorted(set(expected_hf) - set(given_hf))
    unexpected = sorted(set(given_hf) - set(expected_hf))
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, tensor in given_hf.items():
        if tuple(tensor.shape) != tuple(expected_hf[key].shape):
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(expected_hf[key].shape)}")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in given_hf.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.config.dtype = dtype
    if device is not None:
        model.to(device)
    model.eval()
    return model


def save_pretrained(model, save_directory, *, state_dict=None, max_shard_size="5GB") -> None:
    """Write atomically: files go to a temp dir beside the target, then replace it."""
    from huggingface_hub import split_torch_state_dict_into_shards

    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(staging))
        if getattr(model, "generation_config", None) is not None and hasattr(model, "can_generate") and model.can_generate():
            model.generation_config.save_pretrained(str(staging))
        tensors = to_hf_state_dict(state_dict if state_dict is not None else model.state_dict())
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                                   filename_pattern="model{suffix}.safetensors")
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: tensors[k] for k in keys}, str(staging / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        if target.exists():
            # Keep files we do not own (e.g. a tokenizer saved beside the weights).
            for item in target.iterdir():
                stale_weights = item.name.endswith(".safetensors") or item.name == INDEX_FILE
                if not (staging / item.name).exists() and not stale_weights:
                    shutil.move(str(item), staging / item.name)
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
