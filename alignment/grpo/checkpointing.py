"""Atomic GRPO checkpoints: model, optimizer, scheduler, RNG (per process), data position, step.

Layout: `<output_dir>/checkpoints/step-<N>/` holding
    model/               save_pretrained (HF deepseek_v2 layout; a PEFT model saves its adapter)
    optimizer.pt, scheduler.pt, rewards.pt (the reward pipeline's running statistics)
    rng-<rank>.pt        python / numpy / torch RNG of every process
    trainer_state.json   step, data position, config — written last
Under DeepSpeed (ZeRO-2/3, alignment/grpo/zero.py) the engine's state replaces optimizer.pt:
    accelerate/          accelerator.save_state: DeepSpeed's model + ZeRO optimizer shards (every process
                         writes its own), accelerate's RNG files; resume is accelerator.load_state
and model/ is written from the state dict gathered onto the main process (ZeRO-3), so that step-<N>/model
loads like any checkpoint.

Atomicity: everything is written into `.tmp-step-<N>` and the directory is renamed to `step-<N>` in one
`os.rename` once every process has finished writing (a barrier). A `kill -9` at any moment leaves either
no `step-<N>` (the half-written temp dir is ignored and cleared by the next save) or a complete one.
Older complete checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def final_model_dir(output_dir: str | Path) -> Path:
    """Where a finished stage leaves its policy (HF layout + tokenizer): what the next stage starts from."""
    return Path(output_dir) / "final"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under output_dir, or None."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, model, optimizer, scheduler,
                    trainer_state: dict, reward_state: dict | None, keep: int, *, deepspeed: bool = False,
                    model_state: dict | None = None) -> Path:
    """Write step-<step> atomically (module docstring); every process must call it. `deepspeed`: the
    prepared DeepSpeed engine's state through accelerator.save_state instead of optimizer.pt;
    `model_state`: the gathered state dict to write as model/ (ZeRO-3; None: the model's own)."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-run of the same step after resume: replace it
            shutil.rmtree(final)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _atomic_torch_save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if deepspeed:  # collective: every process writes its ZeRO shards
        accelerator.save_state(str(tmp / "accelerate"))
    if accelerator.is_main_process:
        if model_state is not None:
            model.save_pretrained(tmp / "model", state_dict=model_state)
        else:
            model.save_pretrained(tmp / "model")
        if not deepspeed:
            _atomic_torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _atomic_torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if reward_state is not None:
            _atomic_torch_save(reward_state, tmp / "rewards.pt")
        state_path = tmp / "trainer_state.json"
        with open(state_path, "w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        complete = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
        for _, old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _atomic_torch_save(obj, path: Path) -> None:
    part = path.with_suffix(path.suffix + ".part")
    with open(part, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def load_policy_weights(model, checkpoint: Path) -> None:
    """Load step-<N>/model into the live policy (full model or PEFT adapter)."""
    model_dir = checkpoint / "model"
    if hasattr(model, "get_base_model"):  # PEFT: the adapter
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(model_dir)))
        return
    from model.checkpoint import from_hf_state_dict, read_safetensors

    state = read_safetensors(model_dir)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(state), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"checkpoint {model_dir} does not match the policy: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, scheduler, *,
                    deepspeed: bool = False) -> tuple[dict, dict | None]:
    """Restore everything; returns (trainer_state, reward_state). `deepspeed`: model and optimizer from the
    DeepSpeed engine's state (accelerator.load_state), which a checkpoint of the DDP path lacks."""
    if deepspeed:
        if not (checkpoint / "accelerate").is_dir():
            raise RuntimeError(f"{checkpoint} has no DeepSpeed state (accelerate/): it was written without DeepSpeed; "
                               "resume it under the launch config that wrote it")
        accelerator.load_state(str(checkpoint / "accelerate"))
    else:
        if not (checkpoint / "optimizer.pt").is_file():
            raise RuntimeError(f"{checkpoint} has no optimizer.pt: it was written under DeepSpeed; resume it under "
                               "the DeepSpeed launch config that wrote it")
        load_policy_weights(model, checkpoint)
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    rewards_file = checkpoint / "rewards.pt"
    reward_state = torch.load(rewards_file, weights_only=False) if rewards_file.exists() else None
    return json.loads((checkpoint / "trainer_state.json").read_text()), reward_state
