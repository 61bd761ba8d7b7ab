"""DeepSpeed ZeRO-2 / ZeRO-3 for the GRPO trainer, under `accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml`.

What changes against the DDP path (trainer.py keeps one loop for both):
- The policy wrapper (batch.PolicyLogprobs) and AdamW are prepared together, so DeepSpeed builds its engine
  and wraps AdamW in its ZeRO optimizer (stage 2: gradients and optimizer state sharded; stage 3: the
  parameters too). The LR schedule stays ours: a LambdaLR over the same AdamW param groups (DeepSpeed's
  ZeRO optimizer steps those groups), stepped once per optimizer step. (accelerate's scheduler wrapper
  would step it once per process.)
- Accumulation: one optimizer step = the micro-batches of one part of the rollout batch, a number that
  varies from step to step (dynamic sampling). The trainer marks the boundary itself
  (`set_gradient_accumulation_boundary`) and calls `engine.backward(loss, scale_wrt_gas=False)`:
  DeepSpeed would otherwise divide every micro-batch loss by its `gradient_accumulation_steps`, and
  LossNormalizer already normalises by the counts of the whole batch. DeepSpeed, like DDP, averages the
  gradients of the processes, so the loss's world-size factor stays (loss.py). The DeepSpeed config gets
  `gradient_accumulation_steps: 1` and `train_micro_batch_size_per_gpu: grpo.micro_batch_size`
  (bookkeeping only).
- Clipping is DeepSpeed's: its `gradient_clipping` is set to grpo.max_grad_norm (the launch config's
  value is replaced, so that the recipe decides, as on the DDP path).
- ZeRO-3: the model is built partitioned (zero.Init; build_grpo_trainer creates the accelerator before
  the model). Forwards outside the engine's own (rollouts on the live policy, π_old / π_ref passes) gather
  through the hooks DeepSpeed puts on every submodule. Parameters read outside their module's forward
  (`lm_head.weight` in PolicyLogprobs, `kv_b_proj.weight` in absorbed MLA decoding) are registered as
  external parameters of the module that reads them. Full weights (vLLM weight sync, checkpoints, the
  final model) are gathered module by module (`gathered_state_dict`).
- The frozen reference under ZeRO-3 cannot be a deep copy of the partitioned policy: build_grpo_trainer
  builds it again from the checkpoint (partitioned, same seed) and it runs in its own inference-only
  DeepSpeed engine (`reference_engine`). Under ZeRO-2 the parameters are whole: the deep copy stands.
"""

from __future__ import annotations

import torch
from torch import nn


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of an accelerate DeepSpeed launch, None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 has partitioned (some of) the model's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def configure(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config of the launch for the GRPO loop (module docstring), before `prepare`."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"the DeepSpeed config of this launch defines `{key}`: GRPO brings its own AdamW and "
                             "schedule (grpo.learning_rate, warmup_steps); remove it from the DeepSpeed config")
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(max_grad_norm)


def register_external_parameters(policy: nn.Module) -> None:
    """ZeRO-3: parameters read outside their own module's forward, registered with the module that reads
    them, so that its forward gathers them (`policy` is a PolicyLogprobs)."""
    import deepspeed

    from model.attention import MultiHeadLatentAttention

    deepspeed.zero.register_external_parameter(policy, policy.causal_lm().lm_head.weight)
    for module in policy.modules():
        if isinstance(module, MultiHeadLatentAttention):
            deepspeed.zero.register_external_parameter(module, module.kv_b_proj.weight)


def reference_engine(reference: nn.Module, accelerator) -> nn.Module:
    """The partitioned frozen reference (a PolicyLogprobs) in an inference-only DeepSpeed engine: its
    forward gathers the parameters, no optimizer. Call after the policy was prepared (the config is filled)."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("gradient_clipping", None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    register_external_parameters(reference)
    engine.eval()
    return engine


@torch.no_grad()
def gathered_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every ZeRO-3 parameter gathered, as CPU copies, one module at a time (no
    process holds more than one gathered module besides the result). Every process must call it; only the
    main process gets the tensors unless `everywhere` (the others get {})."""
    import deepspeed

    keep = everywhere or torch.distributed.get_rank() == 0
    out = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        own = list(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in own]):
            if not keep:
                continue
            for key, param in own:
                out[prefix + key] = param.detach().to("cpu", copy=True)
            for key, buffer in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    out[prefix + key] = buffer.detach().to("cpu", copy=True)
    return out


def rebuilt_peft(peft_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The PEFT policy rebuilt on this process's CPU from its gathered state dict (meta construction +
    assign, as alignment.sft's ZeRO-3 final save does), to be merged or saved."""
    from alignment.sft import wrap_lora

    base = peft_model.get_base_model()
    with torch.device("meta"):
        rebuilt = wrap_lora(type(base)(base.config), peft_model.peft_config["default"])
    rebuilt.load_state_dict(state_dict, strict=True, assign=True)
    return rebuilt
