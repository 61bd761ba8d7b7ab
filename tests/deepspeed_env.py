"""The environment `accelerate launch` gives one process of a DeepSpeed config, set in-process (a test helper
shared by test_recipe_build.py and test_grpo_train.py; not a test module)."""

from __future__ import annotations

import contextlib
import socket

import torch


@contextlib.contextmanager
def deepspeed_launch_env(accelerate_config: dict, monkeypatch):
    """The environment `accelerate launch` gives one process of a DeepSpeed config (accelerate/utils/
    launch.py), with the process-wide accelerate / DeepSpeed state cleared before (an earlier Accelerator of
    this process must not be reused) and undone afterwards for later tests. Yields the ZeRO stage."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds = accelerate_config["deepspeed_config"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
           "ACCELERATE_MIXED_PRECISION": accelerate_config["mixed_precision"],
           "ACCELERATE_GRADIENT_CLIPPING": str(ds.get("gradient_clipping", "none")),
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds.get("offload_optimizer_device", "none"),
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds.get("offload_param_device", "none"),
           "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(ds.get("zero3_init_flag", False)).lower(),
           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(ds.get("zero3_save_16bit_model", False)).lower(),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield ds["zero_stage"]
    finally:
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _forget_deepspeed_groups()
        for key in env:
            monkeypatch.delenv(key)


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the process groups (and its comm backend) of the first engine in module globals;
    after the process group is destroyed, a later engine in this process must not find the dead ones."""
    import sys

    groups, comm = sys.modules.get("deepspeed.utils.groups"), sys.modules.get("deepspeed.comm.comm")
    for name, value in vars(groups).items() if groups else ():
        if name.startswith("_") and "GROUP" in name and isinstance(value, (dict, torch.distributed.ProcessGroup)):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    if comm is not None:
        comm.cdb = None
