"""Hugging Face deepseek_v2 checkpoints: config.json + safetensors (single file or sharded with an
index), per-expert key names (`mlp.experts.{e}.gate_proj.weight`). Safetensors only: no pickle, no
remote code. Missing, unexpected and mis-shaped keys raise an error naming the key.

In memory the routed experts are stacked ([E, F, D] per projection, model/moe.py); this module
splits them on save, and `RoutedExperts`' load hook stacks them (also from transformers' fused
`gate_up_proj` layout) on load.

DeepSpeed ZeRO-3 (`transformers.integrations.is_deepspeed_zero3_enabled()`, true once a ZeRO-3
TrainingArguments exists): `load_pretrained` builds the model inside `deepspeed.zero.Init`, so every
parameter is partitioned as it is created and no process holds the whole model, then fills it one
module at a time: the module's parameters are gathered, the main process reads just their tensors
from the safetensors files and DeepSpeed scatters them back. Saving a partitioned model needs the
gathered `state_dict` (accelerate's `get_state_dict`); without one it is an error, not empty files.
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
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


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


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or index + shards)."""
    path = Path(path)
    if (path / INDEX_FILE).exists():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({err})") from err
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    hint = " (pickled .bin weights are not loaded: convert them to safetensors)" if any(
        f.endswith((".bin", ".pt")) for f in found) else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; found {found}")


def read_safetensors(path: str | Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; `meta`: meta tensors of the right shape and dtype, read
    from the file headers only (no tensor data is read)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if meta:
                        view = handle.get_slice(key)
                        tensors[key] = torch.empty(view.get_shape(), dtype=_SAFETENSORS_DTYPES[view.get_dtype()],
                                                   device="meta")
                    else:
                        tensors[key] = handle.get_tensor(key)
        except Exception as err:  # safetensors raises several types for truncated / corrupt files
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err
    return tensors


def _lazy_model_tensors(handles: dict[str, object]) -> dict[str, object]:
    """Our parameter names → a function reading that tensor from the open files (`handles`: checkpoint
    key → safe_open handle): per-expert keys are stacked, a fused `gate_up_proj` is split."""
    def read(key):
        return lambda: handles[key].get_tensor(key)

    out, experts = {}, {}
    for key in handles:
        if match := _PER_EXPERT.match(key):
            experts.setdefault(f"{match['prefix']}.{match['proj']}", {})[int(match["e"])] = key
        elif match := _FUSED.match(key):
            for half, proj in enumerate(("gate_proj", "up_proj")):
                out[f"{match['prefix']}.{proj}"] = (lambda k=key, h=half: handles[k].get_tensor(k).chunk(2, dim=1)[h])
        else:
            out[key] = read(key)
    for name, by_expert in experts.items():
        out[name] = lambda keys=by_expert: torch.stack([handles[keys[e]].get_tensor(keys[e]) for e in range(len(keys))])
    return out


def _check_keys(path: Path, expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                init_missing: tuple[str, ...], ignore_unexpected: tuple[str, ...]) -> set[str]:
    """Names and shapes, compared in checkpoint naming so that errors name keys as they are on disk.
    Returns the missing keys that `init_missing` allows (checkpoint naming)."""
    expected_hf, given_hf = to_hf_state_dict(expected), to_hf_state_dict(given)
    missing = sorted(set(expected_hf) - set(given_hf))
    unexpected = sorted(k for k in set(given_hf) - set(expected_hf) if not k.startswith(ignore_unexpected))
    allowed = {k for k in missing if k.startswith(init_missing)} if init_missing else set()
    missing = [k for k in missing if k not in allowed]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, tensor in given_hf.items():
        if key in expected_hf and tuple(tensor.shape) != tuple(expected_hf[key].shape):
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the config expects "
                                  f"{tuple(expected_hf[key].shape)}")
    return allowed


def load_pretrained(cls, path, *, dtype="auto", device=None, init_missing=(), ignore_unexpected=(),
                    partition: bool | None = None, **config_overrides):
    """A `cls` model with the checkpoint's weights. `init_missing`: key prefixes the checkpoint may lack
    (those parameters get `_init_weights`, from the current torch RNG; e.g. a reward head on an LM
    checkpoint); `ignore_unexpected`: key prefixes of the checkpoint to skip (e.g. `lm_head.`).
    `partition`: None = partitioned exactly when a DeepSpeed ZeRO-3 launch is active (module docstring);
    False = a whole model in every process all the same (a rollout engine's own copy, which the trainer
    refills from the gathered policy)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = Path(path)
    init_missing, ignore_unexpected = tuple(init_missing), tuple(ignore_unexpected)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "deepseek_v2":
        raise CheckpointError(f"{config_file}: model_type is {raw.get('model_type')!r}, expected 'deepseek_v2'")
    config = DeepseekV2Config.from_pretrained(str(path), **config_overrides)
    header = from_hf_state_dict(read_safetensors(path, meta=True))
    launched = is_deepspeed_zero3_enabled()
    if partition and not launched:
        raise ValueError(f"{path}: partition=True needs an active DeepSpeed ZeRO-3 launch")
    zero3 = launched if partition is None else partition
    if dtype == "auto" and zero3:
        dtype = None  # the DeepSpeed config's (_load_zero3)
    elif dtype == "auto":
        float_dtypes = {t.dtype for t in header.values() if t.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = cls(config)
    fresh = _check_keys(path, model.state_dict(), header, init_missing, ignore_unexpected)
    if zero3:
        model = _load_zero3(cls, config, path, dtype, init_missing)
        dtype = next(model.parameters()).dtype
    else:
        tensors = to_hf_state_dict(from_hf_state_dict(read_safetensors(path)))
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
                   if not k.startswith(ignore_unexpected)}
        model.load_state_dict(tensors, strict=not fresh, assign=True)
        if fresh:
            _init_fresh(model, init_missing, dtype)
    model.config.dtype = dtype
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _init_fresh(model, prefixes: tuple[str, ...], dtype: torch.dtype) -> None:
    """Materialise and initialise (`_init_weights`) the modules whose parameters are still on meta."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and (name + ".").startswith(prefixes) and any(p.is_meta for p in own):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            module.to(dtype)


def fresh_model(cls, config, dtype: torch.dtype):
    """A freshly initialised `cls(config)` in `dtype` (initialised from the current torch RNG);
    partitioned under DeepSpeed ZeRO-3, where the main process initialises one gathered module at a
    time (so the values differ from the unpartitioned build's, which draws in another order)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return _load_zero3(cls, config, None, dtype, ("",))
    return cls(config).to(dtype)


def _load_zero3(cls, config, path: Path | None, dtype: torch.dtype | None, init_missing: tuple[str, ...]):
    """The model built partitioned (deepspeed.zero.Init) and filled module by module: each module's
    parameters are gathered, the main process copies the checkpoint's tensors in (or initialises those
    under `init_missing`; everything when `path` is None), and leaving the gather scatters them back
    to every process.

    The parameters take the DeepSpeed config's dtype (bf16 / fp16 / fp32 from its mixed precision), as
    in transformers' ZeRO-3 loading; a different explicit `dtype` is an error (None: the config's).
    Not zero.Init's own `dtype` argument: DeepSpeed 0.19 ignores it where the accelerator lacks fp16
    (the CPU) and builds bf16."""
    import contextlib

    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed_config

    partitioned = deepspeed.zero.Init(config_dict_or_path=deepspeed_config())
    if dtype is not None and dtype != partitioned.dtype:
        raise ValueError(f"dtype {dtype} requested, but under DeepSpeed ZeRO-3 the parameters take the DeepSpeed "
                         f"config's dtype, {partitioned.dtype}: make the launch's mixed precision agree")
    with no_init_weights(), partitioned:
        model = cls(config)
    main = torch.distributed.get_rank() == 0
    with contextlib.ExitStack() as stack:
        handles = {}
        if main and path is not None:
            for file in checkpoint_files(path):
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                handles.update({key: handle for key in handle.keys()})
        tensors = _lazy_model_tensors(handles)
        for name, module in model.named_modules():
            own = dict(module.named_parameters(prefix=name, recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
                if not main:
                    continue
                if (name + ".").startswith(init_missing) and not any(key in tensors for key in own):
                    model._init_weights(module)
                    continue
                for key, param in own.items():
                    param.copy_(tensors[key]())
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
        if state_dict is None:
            partitioned = [n for n, p in model.named_parameters() if getattr(p, "ds_numel", 0) and p.numel() == 0]
            if partitioned:
                raise CheckpointError(f"{partitioned[0]!r} is partitioned by DeepSpeed ZeRO-3: pass the gathered "
                                      "state_dict (accelerator.get_state_dict of the DeepSpeed engine)")
            state_dict = model.state_dict()
        tensors = to_hf_state_dict(state_dict)
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
