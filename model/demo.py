"""A short tour of the model: build the tiny preset, save/load it in HF format, check it against
transformers, decode from the latent cache, and print KV-cache sizes.  `python -m model.demo`"""

from __future__ import annotations

import tempfile

import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM, kv_cache_bytes_per_token
from model.generation import SamplingConfig, generate


def main() -> None:
    torch.manual_seed(0)
    config = DeepseekV2Config.preset("tiny", initializer_range=0.1)
    lm = DeepseekV2ForCausalLM(config).eval()
    print(f"tiny DeepSeek-V2: {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters, "
          f"{config.num_hidden_layers} layers ({config.first_k_dense_replace} dense), "
          f"{config.n_routed_experts} routed + {config.n_shared_experts} shared experts, top-{config.num_experts_per_tok}")
    prompt = [[5, 17, 42, 99, 7]]
    with tempfile.TemporaryDirectory() as path:
        lm.save_pretrained(path)
        reloaded = DeepseekV2ForCausalLM.from_pretrained(path)
        import transformers

        theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor(prompt)
        with torch.no_grad():
            diff = (reloaded(ids).logits - theirs(ids).logits).abs().max().item()
        print(f"saved → transformers' DeepseekV2ForCausalLM: max |Δlogit| = {diff:.2e}")
    gen = generate(lm, prompt * 2, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0), return_routing=True)
    for g in gen:
        print(f"sampled {g.token_ids} (finish: {g.finish_reason}), "
              f"logprobs {[round(x, 2) for x in g.logprobs[:4]]}..., routing {tuple(g.routed_experts.shape)}")
    for preset in ("v2", "v2-lite", "tiny"):
        b = kv_cache_bytes_per_token(DeepseekV2Config.preset(preset))
        print(f"{preset:8s} KV cache/token: MLA {b['mla']:>9,} B vs MHA {b['mha']:>10,} B ({b['mha'] / b['mla']:.1f}x)")


if __name__ == "__main__":
    main()
